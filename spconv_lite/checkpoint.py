"""Loading spconv checkpoints: weight layouts of spconv 1.x, 2.0/2.1 and 2.2+.

spconv_lite stores a sparse conv weight as ``[C_out, *kernel_size, C_in]``, the layout of
spconv >= 2.2, so a state dict saved by spconv 2.2 or later (2.3.x included) loads as it is
with ``model.load_state_dict``. Older spconv versions saved other layouts:

=========  ==========================  ====================
source     weight layout               spconv versions
=========  ==========================  ====================
spconv2.2  ``[C_out, *k, C_in]``       2.2 and later (KRSC)
spconv2.1  KRSC or RSKC, per layer     2.1
spconv2.0  ``[*k, C_out, C_in]``       2.0 (RSKC)
spconv1    ``[*k, C_in, C_out]``       1.x (RSCK)
=========  ==========================  ====================

spconv 2.1 saved a layer run with implicit GEMM (its default for kernels of at most 32 offsets
on a CUDA build) as KRSC and one run with its native algorithm as RSKC, so one 2.1 file mixes
both; ``spconv2.1`` tells them apart by shape, layer by layer, and where a shape fits both
(``C_out`` equal to every kernel size) follows 2.1's default, with a warning.

Shapes alone cannot tell spconv 1.x from 2.0 when a layer has as many input as output
channels (``[3, 3, 3, 16, 16]`` fits both), so :func:`convert_state_dict` takes the source
version explicitly; nothing is converted behind your back at load time.

1x1 layers (``layer.conv1x1``: kernel volume 1, submanifold or not strided) are the exception:
every spconv version computes them as ``features @ weight.view(C_in, C_out)``, so their weight's
memory already means the same thing in every layout and converting only reshapes it (permuting
it, as for other layers, would transpose the matrix). The exception to the exception: spconv
2.0 / 2.1 builds made with ``SPCONV_FILTER_HWIO=1`` saved RSCK weights and computed 1x1 layers
as ``features @ weight.view(C_out, C_in).T``; convert such 1x1 weights by hand.

Example:
    >>> import torch
    >>> from spconv_lite.pytorch import SubMConv3d, SparseSequential
    >>> model = SparseSequential(SubMConv3d(4, 16, 3, bias=False))
    >>> old = {"0.weight": torch.randn(3, 3, 3, 4, 16)}  # saved by spconv 1.x
    >>> new = convert_state_dict(old, model, source="spconv1")
    >>> new["0.weight"].shape
    torch.Size([16, 3, 3, 3, 4])
    >>> model.load_state_dict(new)
    <All keys matched successfully>
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

# Source name -> (layout code, description). Codes use spconv's letters: K = C_out,
# C = C_in, R/S/... = the kernel axes.
LAYOUTS: dict[str, tuple[str, str]] = {
    "spconv2.2": ("KRSC", "[C_out, *kernel_size, C_in] (spconv >= 2.2)"),
    "spconv2.0": ("RSKC", "[*kernel_size, C_out, C_in] (spconv 2.0; spconv 2.1 native layers)"),
    "spconv1": ("RSCK", "[*kernel_size, C_in, C_out] (spconv 1.x)"),
}
_ALIASES = {code: name for name, (code, _) in LAYOUTS.items()}
_ALIASES.update({"spconv2.3": "spconv2.2"})
SPCONV21 = "spconv2.1"  # KRSC or RSKC per layer (see the module docstring)


def _source_name(source: str, mixed: bool = False) -> str:
    """The canonical source name; ``mixed`` also allows ``"spconv2.1"``."""
    name = _ALIASES.get(source, source)
    if name not in LAYOUTS and not (mixed and name == SPCONV21):
        names = sorted([*LAYOUTS, SPCONV21] if mixed else LAYOUTS)
        raise ValueError(
            f"source must be one of {names} (or a layout code "
            f"{sorted(code for code, _ in LAYOUTS.values())}), got {source!r}"
        )
    return name


def _spconv21_source(key: str, shape, layer: nn.Module) -> str:
    """The layout one spconv 2.1 layer was saved in: the one its shape fits, else (both fit)
    the one 2.1 chose by default, implicit GEMM's KRSC for at most 32 kernel offsets."""
    fits = [name for name in ("spconv2.2", "spconv2.0") if name in fitting_sources(shape, layer)]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise ValueError(describe_mismatch(key, shape, layer)
                         + " (source='spconv2.1' means [C_out, *k, C_in] or [*k, C_out, C_in])")
    default = "spconv2.2" if math.prod(layer.kernel_size) <= 32 else "spconv2.0"
    if layer.conv1x1:  # both layouts hold a 1x1 weight's matrix in the same memory
        return default
    warnings.warn(
        f"{key}: shape {list(shape)} fits both layouts spconv 2.1 saved; taking "
        f"{LAYOUTS[default][1]}, its default for this kernel (convert this weight yourself if "
        "the layer was built with another algo)", stacklevel=3)
    return default


def saved_shape(source: str, out_channels: int, kernel_size, in_channels: int) -> list[int]:
    """The shape a conv weight has in the checkpoint layout of ``source``."""
    code = LAYOUTS[_source_name(source)][0]
    k = list(kernel_size)
    return {"KRSC": [out_channels, *k, in_channels], "RSKC": [*k, out_channels, in_channels],
            "RSCK": [*k, in_channels, out_channels]}[code]


def to_current_layout(weight: torch.Tensor, source: str, conv1x1: bool = False) -> torch.Tensor:
    """Permutes a conv weight saved in the layout of ``source`` to ``[C_out, *k, C_in]``; the
    weight of a 1x1 layer (``conv1x1``) is reshaped instead, keeping its memory."""
    code = LAYOUTS[_source_name(source)][0]
    ndim = weight.dim() - 2
    if ndim < 1:
        raise ValueError(
            f"a sparse conv weight has at least 3 dimensions, got {list(weight.shape)}"
        )
    kernel_axes = list(range(ndim))
    if code == "KRSC":
        return weight
    if conv1x1:
        pair = weight.shape[ndim:]  # RSKC: (C_out, C_in); RSCK: (C_in, C_out)
        c_out, c_in = pair if code == "RSKC" else pair[::-1]
        return weight.reshape(c_out, *weight.shape[:ndim], c_in).contiguous()
    if code == "RSKC":  # [*k, C_out, C_in]
        return weight.permute(ndim, *kernel_axes, ndim + 1).contiguous()
    return weight.permute(ndim + 1, *kernel_axes, ndim).contiguous()  # RSCK: [*k, C_in, C_out]


def fitting_sources(shape, layer: nn.Module) -> list[str]:
    """The sources whose layout gives a weight of this ``shape`` for ``layer``."""
    return [name for name in LAYOUTS
            if list(shape) == saved_shape(name, layer.out_channels, layer.kernel_size,
                                          layer.in_channels)]


def describe_mismatch(key: str, shape, layer: nn.Module,
                      agreed: Optional[list[str]] = None) -> str:
    """Error text for a checkpoint weight whose shape differs from the layer's.

    ``agreed``: the sources that every mismatching weight of the checkpoint fits (one file
    has one source); the conversion hint names only those. Default: this weight's alone.
    """
    expected = list(layer.weight.shape)
    fits = fitting_sources(shape, layer)
    text = (f"{key}: the checkpoint weight has shape {list(shape)}, the layer expects "
            f"{expected} = [C_out, *kernel_size, C_in]")
    if not fits:
        torch_layout = layer.torch_layout_hint(shape, "load", f"state_dict[{key!r}]")
        if torch_layout:
            return text + torch_layout
        known = ", ".join(
            f"{name} {saved_shape(name, layer.out_channels, layer.kernel_size, layer.in_channels)}"
            for name in LAYOUTS)
        return text + f"; it fits no known spconv layout ({known})"
    text += f"; the checkpoint shape fits the {' / '.join(fits)} layout"
    sources = fits if agreed is None else [name for name in fits if name in agreed]
    if not sources:
        return text + ", but its other weights fit other layouts: is it for this model?"
    if len(sources) < len(fits):
        text += f" (the checkpoint's other weights fit only {' / '.join(sources)})"
    convert = "convert it with spconv_lite.checkpoint.convert_state_dict(state_dict, model, "
    if len(sources) == 1:
        convert += f"source={sources[0]!r})"
        if sources[0] == "spconv2.0":
            convert += ' (a file saved by spconv 2.1 mixes layouts: use source "spconv2.1")'
    else:
        convert += (f"source=...) where source is {' or '.join(map(repr, sources))}, whichever "
                    "spconv version saved it (shapes with equal input and output channels "
                    "cannot tell them apart)")
    return f"{text}: {convert}"


class _MismatchHint(str):
    """A :func:`describe_mismatch` line in ``load_state_dict``'s error list that keeps what it
    was made from, so that later layers of the same load can rewrite it."""


def _hint(key: str, shape, layer: nn.Module, agreed: Optional[list[str]]) -> _MismatchHint:
    hint = _MismatchHint(describe_mismatch(key, shape, layer, agreed))
    hint.key, hint.shape, hint.layer = key, list(shape), layer
    return hint


def add_mismatch_hint(error_msgs: list, key: str, shape, layer: nn.Module) -> None:
    """Appends the hint for one mismatching weight to ``load_state_dict``'s ``error_msgs``.

    The hints already in the list (from earlier layers of the same load) are rewritten so that
    all of them name the same source: the one every mismatching weight fits. Shapes of layers
    with as many input as output channels fit spconv 1.x and 2.0 alike; the other layers tell.
    """
    error_msgs.append(_hint(key, shape, layer, None))
    hints = [i for i, message in enumerate(error_msgs) if isinstance(message, _MismatchHint)]
    fits = [fitting_sources(error_msgs[i].shape, error_msgs[i].layer) for i in hints]
    agreed = [name for name in LAYOUTS if all(name in f for f in fits if f)]
    for i in hints:
        old = error_msgs[i]
        error_msgs[i] = _hint(old.key, old.shape, old.layer, agreed)


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                       source: str) -> dict[str, torch.Tensor]:
    """Converts the sparse conv weights of an older spconv checkpoint to spconv_lite's layout.

    Every ``SparseConvolution`` of ``model`` names one weight (``<module path>.weight``); those
    entries of ``state_dict`` are permuted from the layout of ``source`` to
    ``[C_out, *kernel_size, C_in]`` (reshaped for 1x1 layers, see the module docstring). All
    other entries (biases, BatchNorm, dense layers) are returned unchanged, as are the weights
    of layers missing from ``state_dict``.

    Args:
        state_dict: a flat state dict whose keys match ``model.state_dict()`` (unwrap
            containers such as OpenPCDet's ``checkpoint["model_state"]`` first).
        model: the spconv_lite model the checkpoint is for.
        source: the spconv version that saved it: ``"spconv1"`` (1.x), ``"spconv2.0"``,
            ``"spconv2.1"`` (each layer KRSC or RSKC, told by its shape) or ``"spconv2.2"``
            (2.2 and later: only checks the shapes); the layout codes ``"RSCK"``, ``"RSKC"``,
            ``"KRSC"`` are accepted too.

    Returns:
        A new dict, ready for ``model.load_state_dict``, with ``state_dict``'s ``_metadata``
        (the module versions that ``load_state_dict`` passes to each module's loader).

    Warns when ``state_dict`` holds none of the model's sparse conv weights (keys with another
    prefix, say): nothing is converted then.

    Raises:
        ValueError: a weight whose shape does not fit ``source``'s layout for its layer. The
            message names the parameter, its shape, the expected shape, and the layouts the
            shape does fit, if any.
    """
    from .nn.conv import SparseConvolution

    source = _source_name(source, mixed=True)
    out = OrderedDict(state_dict)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # module versions, which loaders read (BatchNorm, mmdet3d's hooks)
        out._metadata = metadata
    layers = [(name, layer) for name, layer in model.named_modules(remove_duplicate=False)
              if isinstance(layer, SparseConvolution)]
    found = 0
    for name, layer in layers:
        key = f"{name}.weight" if name else "weight"
        if key not in out:
            continue
        found += 1
        weight = out[key]
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{key} must be a tensor, got {type(weight).__name__}")
        layer_source = (_spconv21_source(key, weight.shape, layer) if source == SPCONV21
                        else source)
        wanted = saved_shape(layer_source, layer.out_channels, layer.kernel_size,
                             layer.in_channels)
        if list(weight.shape) != wanted:
            raise ValueError(
                describe_mismatch(key, weight.shape, layer)
                + f" (source={source!r} means {LAYOUTS[source][1]}, here {wanted})"
            )
        out[key] = to_current_layout(weight, layer_source, layer.conv1x1)
    if layers and not found:
        first = layers[0][0] or "weight"
        warnings.warn(
            f"state_dict holds none of the model's {len(layers)} sparse conv weights (the "
            f"first is {first + '.weight'!r}, the state_dict's first key "
            f"{next(iter(state_dict), None)!r}), so nothing was converted: if the keys have "
            "another prefix, strip or add it to match the model (e.g. DDP's 'module.', or "
            "pass the submodule the weights are for)", stacklevel=2)
    return out
