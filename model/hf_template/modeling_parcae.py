"""An exported Parcae looped language model (or its fixed-depth GPT baseline) as a Hugging Face remote-code
model: `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.

Self-contained (torch and transformers only) and inference-only: the forward the training pipeline computes
(prelude, the stable diagonal injection or the add / concat baselines, the core looped ``loops`` times, the
readout C, coda, the tied head), with the same parameter names, so its logits equal the pipeline's. The
loop count is ``config.loops`` unless a forward (or ``generate``) passes ``loops=T``; h_0 follows
``config.h0``.

``generate`` uses a KV cache, the one the training pipeline's generation uses: transformers' own
``DynamicCache`` with one layer entry per prelude and coda layer and one per core layer *per loop* (a new
token at loop t attends to the earlier tokens' keys and values at loop t), so cached generation gives the
uncached tokens. ``attention_mask`` is honoured (left-padded batches: no position attends to padding);
beyond ``max_seq_len`` tokens generation slides a window without the cache, as the pipeline does.

This file is the second copy of the model (`model/parcae.py` is the first): it must stay self-contained for
remote code. tests/pipeline/jobs/test_hf_export.py holds the two to the same logits, loop counts and greedy
tokens; a change to either needs the other.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_parcae import ParcaeHFConfig

VE_GATE_CHANNELS = 32
VOCAB_MULTIPLE = 64
# transformers 5 names the cache ``cache``; 4.x named it ``past_key_values``
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _unique_layers(config):
    return config.n_prelude + config.n_core + config.n_coda if config.arch == "parcae" else config.n_layers


def _has_value_embedding(config, layer):
    return config.value_embeddings and layer % 2 == (_unique_layers(config) - 1) % 2


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rotary_tables(seq_len, head_dim, base, device):
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    x = x.float()
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, config, has_value_embedding):
        super().__init__()
        d = config.d_model
        self.n_head, self.head_dim, self.eps = config.n_head, d // config.n_head, config.norm_eps
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, d, bias=False)
        self.c_v = nn.Linear(d, d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, config.n_head, bias=False) if has_value_embedding else None

    def forward(self, x, rope, ve, kv=None):
        """``kv``: None (causal attention over x), or (cache, layer index, mask) to attend to the cached
        positions too (mask None: causal without padding)."""
        b, t, _ = x.shape
        shape = (b, t, self.n_head, self.head_dim)
        q, k, v = self.c_q(x).view(shape), self.c_k(x).view(shape), self.c_v(x).view(shape)
        if ve is not None:
            v = v + (2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))).unsqueeze(-1) * ve.view(shape)
        q = F.rms_norm(apply_rotary(q, *rope), (self.head_dim,), eps=self.eps).to(x.dtype)
        k = F.rms_norm(apply_rotary(k, *rope), (self.head_dim,), eps=self.eps).to(x.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = None
        if kv is not None:
            cache, index, mask = kv
            if cache is not None:
                k, v = cache.update(k, v, index)
        causal = mask is None and k.shape[2] == t
        if mask is None and not causal:  # one cached batch without padding: new positions see every earlier one
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.head_dim**-0.5)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        return self.proj(0.5 * F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.norm_1 = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, _has_value_embedding(config, layer))
        self.norm_2 = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config.d_model)

    def forward(self, x, rope, ve, kv=None):
        x = x + self.attn(self.norm_1(x), rope, ve, kv)
        return x + self.mlp(self.norm_2(x))


class DiagonalInjection(nn.Module):
    MIN_RATE, MAX_A_LOG = 1e-6, 80.0

    def __init__(self, d):
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(d))
        self.dt_bias = nn.Parameter(torch.zeros(d))
        self.B = nn.Parameter(torch.zeros(d, d))

    def forward(self, h, e):
        delta = F.softplus(self.dt_bias.float())
        rate = delta * torch.exp(self.A_log.float().clamp(max=self.MAX_A_LOG))
        a_bar = torch.exp(-rate.clamp(min=self.MIN_RATE))
        return (a_bar * h + delta * F.linear(e, self.B)).to(h.dtype)


class AddInjection(nn.Module):
    def forward(self, h, e):
        return h + e


class ConcatInjection(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d, 2 * d))

    def forward(self, h, e):
        return F.linear(torch.cat((h, e), dim=-1), self.weight)


class TiedEmbedding(nn.Embedding):
    def forward(self, x, as_head=False):
        return F.linear(x, self.weight) if as_head else super().forward(x)


def _blocks(config, first, n):
    return nn.ModuleList(Block(config, first + i) for i in range(n))


def _value_embeddings(config, layers, vocab):
    return nn.ModuleDict({str(i): nn.Embedding(vocab, config.d_model) for i in layers})


class Recurrence(nn.Module):
    def __init__(self, config, vocab):
        super().__init__()
        injections = {"diagonal": DiagonalInjection, "add": lambda d: AddInjection(), "concat": ConcatInjection}
        self.adapter = injections[config.injection](config.d_model)
        self.core_block = _blocks(config, config.n_prelude, config.n_core)
        core = range(config.n_prelude, config.n_prelude + config.n_core)
        self.value_embeds = _value_embeddings(config, [i for i in core if _has_value_embedding(config, i)], vocab)

    def forward(self, h, e, idx, rope, loops, kv):
        """``kv``: (cache, first index, mask); core layer j at loop l is entry first + l * n_core + j."""
        cache, first, mask = kv
        for loop in range(loops):
            u = self.adapter(h, e)
            for j, block in enumerate(self.core_block):
                key = str(block.layer)
                ve = self.value_embeds[key](idx) if key in self.value_embeds else None
                u = block(u, rope, ve, (cache, first + loop * len(self.core_block) + j, mask))
            h = u
        return h


class ParcaeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ParcaeHFConfig
    base_model_prefix = "transformer"
    _no_split_modules = ("Block", "Recurrence")

    def __init__(self, config):
        super().__init__(config)
        d = config.d_model
        vocab = math.ceil(config.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        layers = range(_unique_layers(config))
        if config.arch == "parcae":
            self.transformer = nn.ModuleDict(
                {
                    "wte": TiedEmbedding(vocab, d),
                    "prelude": _blocks(config, 0, config.n_prelude),
                    "ln_prelude": RMSNorm(d, config.norm_eps),
                    "recurrence": Recurrence(config, vocab),
                    "C": nn.Linear(d, d, bias=False),
                    "coda": _blocks(config, config.n_prelude + config.n_core, config.n_coda),
                    "ln_f": RMSNorm(d, config.norm_eps),
                }
            )
            core = range(config.n_prelude, config.n_prelude + config.n_core)
            outside = [i for i in layers if _has_value_embedding(config, i) and i not in core]
        else:
            self.transformer = nn.ModuleDict(
                {
                    "wte": TiedEmbedding(vocab, d),
                    "h": _blocks(config, 0, config.n_layers),
                    "ln_f": RMSNorm(d, config.norm_eps),
                }
            )
            outside = [i for i in layers if _has_value_embedding(config, i)]
        self.value_embeds = _value_embeddings(config, outside, vocab)
        self.post_init()

    def _init_weights(self, module):  # every weight comes from model.safetensors
        pass

    def get_input_embeddings(self):
        return self.transformer.wte

    def _value_embedding(self, block, idx):
        key = str(block.layer)
        return self.value_embeds[key](idx) if key in self.value_embeds else None

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # the forward makes its own DynamicCache: its number of layers depends on the loop count

    def forward(
        self,
        input_ids,
        attention_mask=None,
        labels=None,
        loops=None,
        return_dict=None,
        use_cache=None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ):
        idx = input_ids
        t = idx.shape[1]
        d = self.config.d_model
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = DynamicCache()
        past = cache.get_seq_length(0) if cache is not None else 0
        cos, sin = rotary_tables(past + t, d // self.config.n_head, self.config.rope_base, idx.device)
        rope = (cos[past:], sin[past:])
        mask = None
        if attention_mask is not None and not bool(attention_mask[:, : past + t].all()):
            real = attention_mask[:, : past + t].bool()
            query = torch.arange(past, past + t, device=idx.device)[:, None]
            key = torch.arange(past + t, device=idx.device)[None, :]
            mask = ((key <= query)[None] & (real[:, None, :] | (key == query)[None]))[:, None]
        x = self.transformer.wte(idx)
        if self.config.arch == "parcae":
            n_prelude, n_coda = self.config.n_prelude, self.config.n_coda
            for j, block in enumerate(self.transformer.prelude):
                x = block(x, rope, self._value_embedding(block, idx), (cache, j, mask))
            e = self.transformer.ln_prelude(x)
            if self.config.h0 == "like_init":
                sigma = math.sqrt(2.0 / (5.0 * d))
                h = torch.empty(e.shape, dtype=torch.float32, device=e.device)
                nn.init.trunc_normal_(h, 0.0, sigma, -3 * sigma, 3 * sigma)
                h = h.to(e.dtype)
            else:
                h = torch.zeros_like(e)
            loops = self.config.loops if loops is None else int(loops)
            h = self.transformer.recurrence(h, e, idx, rope, loops, (cache, n_prelude + n_coda, mask))
            x = self.transformer.C(h)
            for j, block in enumerate(self.transformer.coda):
                x = block(x, rope, self._value_embedding(block, idx), (cache, n_prelude + j, mask))
        else:
            for j, block in enumerate(self.transformer.h):
                x = block(x, rope, self._value_embedding(block, idx), (cache, j, mask))
        logits = self.transformer.wte(self.transformer.ln_f(x), as_head=True).float()
        logits = logits[..., : self.config.vocab_size]  # padded vocabulary entries are never predicted
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].reshape(-1, logits.size(-1))
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids, loops=None, attention_mask=None, use_cache=True, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        window = self.config.max_seq_len
        if not use_cache or input_ids.shape[1] > window:  # the window slides: the whole window, no cache
            mask = attention_mask[:, -window:] if attention_mask is not None else None
            return {"input_ids": input_ids[:, -window:], "attention_mask": mask, "loops": loops, "use_cache": False}
        past = cache.get_seq_length(0) if cache is not None else 0
        return {
            "input_ids": input_ids[:, past:],
            "attention_mask": attention_mask,
            CACHE_FIELD: cache,
            "loops": loops,
            "use_cache": True,
        }
