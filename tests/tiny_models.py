"""Small, randomly initialised transformers models for parity tests of every family.

Each builder seeds torch before constructing the model, so the same weights come out on every
run. Weights are drawn wider than the families' usual init (std 0.2 instead of 0.02) so that
logits are peaked and greedy decoding does not hinge on near-ties that fp32 rounding could flip.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 272  # 256 byte symbols + a few specials fit the byte-level tokenizer below
MAX_POSITIONS = 128
INIT_STD = 0.2
SPECIAL_IDS = {"pad": 0, "bos": 1, "eos": 2}


def _finish(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode, and no eos stop in transformers' ``generate`` (tests compare fixed lengths)."""
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = SPECIAL_IDS["pad"]
    return model


def tiny_gpt2(seed: int = 0) -> PreTrainedModel:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=MAX_POSITIONS,
        initializer_range=INIT_STD,
        bos_token_id=SPECIAL_IDS["bos"],
        eos_token_id=SPECIAL_IDS["eos"],
    )
    torch.manual_seed(seed)
    return _finish(GPT2LMHeadModel(config))


def tiny_opt(
    seed: int = 0, pre_norm: bool = True, word_embed_proj_dim: int | None = None
) -> PreTrainedModel:
    hidden = 64
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        do_layer_norm_before=pre_norm,
        word_embed_proj_dim=word_embed_proj_dim or hidden,
        init_std=INIT_STD,
        pad_token_id=SPECIAL_IDS["pad"],
        bos_token_id=SPECIAL_IDS["bos"],
        eos_token_id=SPECIAL_IDS["eos"],
    )
    torch.manual_seed(seed)
    return _finish(OPTForCausalLM(config))


# Settings shared by the Llama-architecture builders (Llama, Mistral).
LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    max_position_embeddings=MAX_POSITIONS,
    initializer_range=INIT_STD,
    bos_token_id=SPECIAL_IDS["bos"],
    eos_token_id=SPECIAL_IDS["eos"],
    pad_token_id=SPECIAL_IDS["pad"],
)


def tiny_llama(seed: int = 0, rope_scaling: dict | None = None) -> PreTrainedModel:
    config = LlamaConfig(
        **LLAMA_LIKE,
        num_hidden_layers=3,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=rope_scaling,
    )
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(config))


def tiny_llama3_rope(seed: int = 0) -> PreTrainedModel:
    # original_max_position_embeddings is small so the smoothing band covers real frequencies.
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    return tiny_llama(seed, rope_scaling=scaling)


def tiny_mistral_window(seed: int = 0) -> PreTrainedModel:
    """A sliding window (5) shorter than the test prompts, so the window really cuts."""
    config = MistralConfig(**LLAMA_LIKE, num_hidden_layers=2, sliding_window=5)
    torch.manual_seed(seed)
    return _finish(MistralForCausalLM(config))


def tiny_qwen2(seed: int = 0, intermediate_size: int = 128) -> PreTrainedModel:
    """Qwen2: biases on Q/K/V (drawn like the weights, so a lost bias shows), RoPE theta 1e6,
    an untied head as the 0.5B GGUF has one. (K-quant blocks need ``intermediate_size`` a
    multiple of 256 for the down projection.)"""
    config = Qwen2Config(
        **(LLAMA_LIKE | {"intermediate_size": intermediate_size}),
        num_hidden_layers=2,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.bias"):
                param.normal_(0, INIT_STD)
    return _finish(model)


TINY_MODELS: dict[str, Callable[[], PreTrainedModel]] = {
    "gpt2": tiny_gpt2,
    "opt_pre_norm": lambda: tiny_opt(pre_norm=True),
    "opt_post_norm": lambda: tiny_opt(pre_norm=False),
    "opt_projected": lambda: tiny_opt(pre_norm=False, word_embed_proj_dim=32),
    "llama_gqa": tiny_llama,
    "llama3_rope": tiny_llama3_rope,
    "mistral_window": tiny_mistral_window,
    "qwen2": tiny_qwen2,
}


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A merge-free byte-level BPE tokenizer: every byte is a token, plus three specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(specials + sorted(alphabet))}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def save_tiny(
    model: PreTrainedModel, directory: Path, with_tokenizer: bool = False, safetensors: bool = True
) -> Path:
    """Write a model dir like the hub's: config.json plus safetensors or pytorch_model.bin."""
    directory.mkdir(parents=True, exist_ok=True)
    if safetensors:
        model.save_pretrained(str(directory))
    else:
        # transformers 5 always writes safetensors, so write the legacy pickle file by hand.
        model.config.save_pretrained(str(directory))
        state = {key: value.clone() for key, value in model.state_dict().items()}
        torch.save(state, directory / "pytorch_model.bin")
    if with_tokenizer:
        byte_level_tokenizer().save_pretrained(str(directory))
    return directory


def _interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' half-split Q/K rows -> llama.cpp's per-pair interleaved rows."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def _llama3_rope_divisors(config: LlamaConfig) -> torch.Tensor:
    """What llama.cpp's converter stores as ``rope_freqs``: default / scaled frequency."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    default = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    return default / scaled


def save_tiny_gguf(
    model: PreTrainedModel,
    path: Path,
    architecture: str = "llama",
    block_types: dict[str, str] | None = None,
) -> Path:
    """Write a Llama or Qwen2 model as a GGUF file laid out the way llama.cpp's converter does.

    Llama's Q/K rows are interleaved per rotary pair (Qwen2's are not, as llama.cpp leaves
    them), Qwen2's Q/K/V biases are written, and Llama-3 RoPE scaling goes into a
    ``rope_freqs`` tensor. ``block_types`` stores some weights in GGUF block formats by
    tensor kind (e.g. ``{"attn_q": "Q8_0", "ffn_down": "Q4_K"}``): the types gguf-py can
    quantise are quantised from the weights; K-quants, which it cannot, are random blocks
    (``random_k_blocks``) whose values then stand for the weight. Read the file back with
    ``gguf_reference`` for a transformers model holding exactly the file's values. An
    architecture other than llama / qwen2 (tests of refusals) is written like llama. No
    tokenizer metadata is written.
    """
    import gguf

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    interleave = architecture != "qwen2"
    block_types = block_types or {}
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny-{architecture}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_bos_token_id(SPECIAL_IDS["bos"])
    writer.add_eos_token_id(SPECIAL_IDS["eos"])

    def rows(weight: torch.Tensor, n: int) -> torch.Tensor:
        return _interleave_rotary(weight, n) if interleave else weight

    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    if config.rope_parameters.get("rope_type", "default") == "llama3":
        tensors["rope_freqs.weight"] = _llama3_rope_divisors(config)
    for i in range(config.num_hidden_layers):
        p, g = f"model.layers.{i}.", f"blk.{i}."
        a = p + "self_attn."
        tensors[g + "attn_norm.weight"] = state[p + "input_layernorm.weight"]
        tensors[g + "ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
        tensors[g + "attn_q.weight"] = rows(state[a + "q_proj.weight"], heads)
        tensors[g + "attn_k.weight"] = rows(state[a + "k_proj.weight"], kv_heads)
        tensors[g + "attn_v.weight"] = state[a + "v_proj.weight"]
        if a + "q_proj.bias" in state:
            tensors[g + "attn_q.bias"] = state[a + "q_proj.bias"]
            tensors[g + "attn_k.bias"] = state[a + "k_proj.bias"]
            tensors[g + "attn_v.bias"] = state[a + "v_proj.bias"]
        tensors[g + "attn_output.weight"] = state[a + "o_proj.weight"]
        tensors[g + "ffn_gate.weight"] = state[p + "mlp.gate_proj.weight"]
        tensors[g + "ffn_up.weight"] = state[p + "mlp.up_proj.weight"]
        tensors[g + "ffn_down.weight"] = state[p + "mlp.down_proj.weight"]
    for seed, (name, tensor) in enumerate(tensors.items()):
        kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        block = block_types.get(kind) if name.endswith(".weight") else None
        if block is None:
            writer.add_tensor(name, tensor.contiguous().numpy())
            continue
        qtype = gguf.GGMLQuantizationType[block]
        if block.endswith("_K"):
            raw = random_k_blocks(block, tuple(tensor.shape), seed)
        else:
            raw = gguf.quants.quantize(tensor.contiguous().numpy(), qtype)
        writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_k_blocks(kind: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Random GGUF K-quant blocks for a [rows, cols] weight (cols a multiple of 256): random
    codes, with small positive fp16 super-block scales so the values stay weight-sized."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    scale = rng.uniform(1e-4, 2e-3, raw.shape[:2]).astype(np.float16)
    if kind == "Q6_K":  # scales are int8 and d is the block's last two bytes
        raw[..., -2:] = scale.view(np.uint8).reshape(rows, -1, 2)
    else:  # d (and dmin) lead the block
        raw[..., 0:2] = scale.view(np.uint8).reshape(rows, -1, 2)
        raw[..., 2:4] = (scale / 4).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    return raw.reshape(rows, -1)


def gguf_reference(model: PreTrainedModel, path: Path) -> PreTrainedModel:
    """``model`` with every weight replaced by the GGUF file's dequantised values (gguf-py's
    own dequantiser; Llama's Q/K rows de-interleaved back), so transformers computes what the
    file holds."""
    import gguf

    values = {
        t.name: torch.from_numpy(
            gguf.quants.dequantize(t.data, t.tensor_type).astype("float32")
        ).reshape(tuple(int(n) for n in reversed(t.shape.tolist())))
        for t in gguf.GGUFReader(str(path)).tensors
    }
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    interleaved = model.config.model_type != "qwen2"

    def rows(weight: torch.Tensor, n: int) -> torch.Tensor:
        if not interleaved:
            return weight
        r = weight.shape[0]
        return weight.reshape(n, r // n // 2, 2, -1).transpose(1, 2).reshape(weight.shape)

    names = {
        "model.embed_tokens.weight": values["token_embd.weight"],
        "model.norm.weight": values["output_norm.weight"],
        "lm_head.weight": values["output.weight"],
    }
    for i in range(config.num_hidden_layers):
        p, g = f"model.layers.{i}.", f"blk.{i}."
        a = p + "self_attn."
        names |= {
            p + "input_layernorm.weight": values[g + "attn_norm.weight"],
            p + "post_attention_layernorm.weight": values[g + "ffn_norm.weight"],
            a + "q_proj.weight": rows(values[g + "attn_q.weight"], heads),
            a + "k_proj.weight": rows(values[g + "attn_k.weight"], kv_heads),
            a + "v_proj.weight": values[g + "attn_v.weight"],
            a + "o_proj.weight": values[g + "attn_output.weight"],
            p + "mlp.gate_proj.weight": values[g + "ffn_gate.weight"],
            p + "mlp.up_proj.weight": values[g + "ffn_up.weight"],
            p + "mlp.down_proj.weight": values[g + "ffn_down.weight"],
        }
        if g + "attn_q.bias" in values:
            names |= {
                a + "q_proj.bias": values[g + "attn_q.bias"],
                a + "k_proj.bias": values[g + "attn_k.bias"],
                a + "v_proj.bias": values[g + "attn_v.bias"],
            }
    reference = type(model)(model.config)
    reference.load_state_dict(names, strict=True)
    return _finish(reference)


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def save_tiny_chat_llama(directory: Path) -> Path:
    """A tiny Llama with the byte-level tokenizer and a minimal chat template, saved as a
    Hugging Face model directory that ``quicksilver.load`` (and the server) can read."""
    save_tiny(tiny_llama(), directory)
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return directory
