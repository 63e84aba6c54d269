"""Int8 weights on disk and int8 Linear layers at serving time (``lmaas compress --int8``).

A compressed version stores ``model.int8.safetensors`` instead of ``model.safetensors``: the
weight of every ``nn.Linear`` as int8 with one float32 scale per output row (symmetric,
``weight ≈ int8 * scale``), every other tensor as it was. That makes the version about 4 times
smaller on disk where Linear layers hold the weights (transformers' ``from_pretrained`` cannot
read it, so the runtimes load it here). At load the model is built from ``config.json``, the
other tensors are loaded, and each Linear becomes torch's dynamically quantised Linear whose
packed int8 weight is exactly the stored one: matrix products run as int8 GEMMs with
activations quantised per batch.

The same dynamic quantisation is applied to a float checkpoint when its manifest sets
``serving.options.quantize: int8`` (the weights on disk then stay float32).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lmaas.core.errors import ModelLoadError

INT8_WEIGHTS_FILE = "model.int8.safetensors"
"""The weights file of an int8 version."""

FORMAT_TAG = "lmaas-int8-linear/v1"
"""``format`` entry of the safetensors metadata; a different one is refused at load."""

_SCALE_SUFFIX = ".weight_scale"


def wants_int8(options: Mapping[str, str], model_dir: Path) -> bool:
    """True when the version is served in int8: it ships int8 weights or asks for them.

    Raises:
        ModelLoadError: the ``quantize`` option names something other than ``int8``.
    """
    value = options.get("quantize", "").strip().lower()
    if value not in ("", "int8"):
        raise ModelLoadError(f"serving option quantize={value!r} is not supported; use int8")
    return value == "int8" or (model_dir / INT8_WEIGHTS_FILE).is_file()


def int8_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors to save for ``model``: Linear weights as int8 + per-row scales.

    Returns:
        ``(tensors, quantized_module_names)``.
    """
    linear = {name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module in linear:
            weight = value.detach().float()
            scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
            tensors[key] = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
            tensors[module + _SCALE_SUFFIX] = scale.contiguous()
        else:
            tensors[key] = value.detach().contiguous().clone()
    return tensors, sorted(linear)


def save_int8(model: torch.nn.Module, dest_dir: Path) -> Path:
    """Write ``model``'s weights as :data:`INT8_WEIGHTS_FILE` into ``dest_dir``."""
    from safetensors.torch import save_file

    tensors, modules = int8_state(model)
    path = dest_dir / INT8_WEIGHTS_FILE
    save_file(tensors, str(path), metadata={"format": FORMAT_TAG, "modules": json.dumps(modules)})
    return path


def load_int8(model_dir: Path, auto_class: str, trust_remote_code: bool = False) -> Any:
    """Build ``transformers.<auto_class>`` from ``model_dir`` with int8 Linear layers.

    Reads :data:`INT8_WEIGHTS_FILE` when present; otherwise loads the float checkpoint and
    quantises its Linear weights now.

    Raises:
        ModelLoadError: the files are missing, of another format, or do not fit the config.
    """
    import transformers

    path = model_dir / INT8_WEIGHTS_FILE
    cls = getattr(transformers, auto_class)
    try:
        if not path.is_file():
            model = cls.from_pretrained(
                str(model_dir), dtype=torch.float32, local_files_only=True,
                use_safetensors=True, trust_remote_code=trust_remote_code,
            )  # fmt: skip
            return _quantize_linear(model.eval(), None)
        config = transformers.AutoConfig.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code
        )
        model = cls.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise ModelLoadError(f"cannot load {model_dir} as {auto_class}: {exc}") from exc
    tensors, modules = _read(path)
    float_state = {k: v for k, v in tensors.items() if not k.endswith(_SCALE_SUFFIX)}
    for name in modules:
        float_state[f"{name}.weight"] = _dequantize(tensors, name)
    missing, unexpected = model.load_state_dict(float_state, strict=False)
    if unexpected or [k for k in missing if k in model.state_dict()]:
        raise ModelLoadError(
            f"{path.name} does not fit {model_dir}/config.json "
            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
        )
    return _quantize_linear(model.eval(), {n: _stored(tensors, n) for n in modules})


def _read(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        if meta.get("format") != FORMAT_TAG:
            raise ModelLoadError(f"{path.name} is not in {FORMAT_TAG} format")
        modules = json.loads(meta["modules"])
    except (OSError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    return tensors, [str(m) for m in modules]


def _dequantize(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return tensors[f"{name}.weight"].float() * tensors[name + _SCALE_SUFFIX][:, None]


def _stored(tensors: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tensors[f"{name}.weight"], tensors[name + _SCALE_SUFFIX]


def _quantize_linear(
    model: torch.nn.Module, stored: dict[str, tuple[torch.Tensor, torch.Tensor]] | None
) -> torch.nn.Module:
    """Swap every Linear for torch's dynamic int8 Linear; use the stored int8 rows if given."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices, once per process
        quantized: torch.nn.Module = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {torch.nn.Linear}, dtype=torch.qint8
        )
        if stored is None:
            return quantized
        modules = dict(quantized.named_modules())
        for name, (weight, scale) in stored.items():
            module = modules[name]
            qweight = torch._make_per_channel_quantized_tensor(
                weight, scale.double(), torch.zeros(scale.shape[0], dtype=torch.long), 0
            )
            module.set_weight_bias(qweight, module.bias())
    return quantized
