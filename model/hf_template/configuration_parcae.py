"""Configuration of an exported Parcae model (a Hugging Face remote-code model; `parcae export --format hf`).

Self-contained: imports transformers only. The fields are the pipeline's model config, plus ``loops`` (the
test-time loop count a forward uses unless given one) and ``h0`` ("zeros", the default, for reproducible
scores, or "like_init": a fresh truncated normal per forward).
"""

from transformers import PretrainedConfig


class ParcaeHFConfig(PretrainedConfig):
    model_type = "parcae"

    def __init__(
        self,
        arch="parcae",
        vocab_size=32768,
        d_model=768,
        n_head=6,
        n_prelude=2,
        n_core=2,
        n_coda=2,
        n_layers=12,
        max_seq_len=2048,
        injection="diagonal",
        mean_recurrence=8,
        mean_backprop_depth=4,
        h0_init="like_init",
        activation_checkpointing=True,
        value_embeddings=True,
        rope_base=50000.0,
        norm_eps=1e-5,
        loops=None,
        h0="zeros",
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        **kwargs,
    ):
        self.arch, self.vocab_size, self.d_model, self.n_head = arch, vocab_size, d_model, n_head
        self.n_prelude, self.n_core, self.n_coda, self.n_layers = n_prelude, n_core, n_coda, n_layers
        self.max_seq_len, self.injection, self.rope_base, self.norm_eps = max_seq_len, injection, rope_base, norm_eps
        self.mean_recurrence, self.mean_backprop_depth, self.h0_init = mean_recurrence, mean_backprop_depth, h0_init
        self.activation_checkpointing, self.value_embeddings = activation_checkpointing, value_embeddings
        self.loops = mean_recurrence if loops is None else loops
        self.h0 = h0
        # the names transformers' utilities look for
        self.hidden_size, self.num_attention_heads, self.max_position_embeddings = d_model, n_head, max_seq_len
        self.num_hidden_layers = n_prelude + n_core + n_coda if arch == "parcae" else n_layers
        kwargs.setdefault("tie_word_embeddings", False)  # the head is the embedding module itself, not a copy
        kwargs.setdefault("use_cache", True)  # generate() runs through the KV cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
