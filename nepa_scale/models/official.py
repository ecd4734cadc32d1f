"""Interop with the official NEPA checkpoints (SixAILab/nepa-{base,large}-patch14-224[-sft]).

The official state dicts use Hugging Face ``ViTNepa*`` names (docs/official_layout.md)
with separate query/key/value projections; ours fuse them into one ``qkv`` matrix. Conversion is
a pure renaming plus a concatenation/split, so a round trip is exact. Files are read locally
(``.safetensors``, or ``.bin``/``.pt`` through ``torch.load(weights_only=True)``); nothing is downloaded.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nepa_scale.errors import CheckpointError, LayoutError, UnsafePickle
from nepa_scale.models.vit import NEPA, NepaArch

PREFIX = "vit_nepa."
HEAD_KEYS = ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")

# (our suffix inside blocks.{i}., official suffix inside vit_nepa.encoder.layer.{i}.)
_BLOCK_RENAMES = [
    ("norm1", "layernorm_before"),
    ("norm2", "layernorm_after"),
    ("attn.q_norm", "attention.attention.q_norm"),
    ("attn.k_norm", "attention.attention.k_norm"),
    ("attn.proj", "attention.output.dense"),
    ("ls1.gamma", "layer_scale.lambda1"),
    ("mlp.fc1", "intermediate.up_proj"),
    ("mlp.gate", "intermediate.gate_proj"),
    ("mlp.fc2", "output.dense"),
    ("ls2.gamma", "output.layer_scale.lambda1"),
]
_TOP_RENAMES = [
    ("cls_token", PREFIX + "embeddings.cls_token"),
    ("patch_embed.proj", PREFIX + "embeddings.patch_embeddings.projection"),
    ("norm", PREFIX + "layernorm"),
    ("fc_norm", "fc_norm"),
    ("head", "classifier"),
]
_QKV_OFFICIAL = ("query", "key", "value")


def _rename(key: str, renames: list[tuple[str, str]], reverse: bool) -> str | None:
    for ours, theirs in renames:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        if key == src or key.startswith(src + "."):
            return dst + key[len(src) :]
    return None


def to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our layout -> official layout (qkv split into query/key/value)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if match:
            layer, rest = match.groups()
            base = f"{PREFIX}encoder.layer.{layer}."
            qkv = re.fullmatch(r"attn\.qkv\.(weight|bias)", rest)
            if qkv:
                for name, part in zip(_QKV_OFFICIAL, value.chunk(3, dim=0), strict=True):
                    out[f"{base}attention.attention.{name}.{qkv.group(1)}"] = part.clone()
                continue
            renamed = _rename(rest, _BLOCK_RENAMES, reverse=False)
            if renamed is None:
                raise LayoutError(f"no official name for key '{key}'")
            out[base + renamed] = value
            continue
        renamed = _rename(key, _TOP_RENAMES, reverse=False)
        if renamed is None:
            raise LayoutError(f"no official name for key '{key}'")
        out[renamed] = value
    return out


def from_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official layout -> our layout. Keys we do not know are kept as-is so the strict check names them."""
    out: dict[str, torch.Tensor] = {}
    pending_qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = re.fullmatch(re.escape(PREFIX) + r"encoder\.layer\.(\d+)\.(.+)", key)
        if match:
            layer, rest = match.groups()
            qkv = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
            if qkv:
                pending_qkv.setdefault((layer, qkv.group(2)), {})[qkv.group(1)] = value
                continue
            renamed = _rename(rest, _BLOCK_RENAMES, reverse=True)
            out[f"blocks.{layer}.{renamed}" if renamed else key] = value
            continue
        renamed = _rename(key, _TOP_RENAMES, reverse=True)
        out[renamed if renamed else key] = value
    for (layer, kind), parts in pending_qkv.items():
        missing = [
            f"{PREFIX}encoder.layer.{layer}.attention.attention.{n}.{kind}"
            for n in _QKV_OFFICIAL
            if n not in parts
        ]
        if missing:
            raise LayoutError(f"missing keys: {', '.join(missing)}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[n] for n in _QKV_OFFICIAL], dim=0)
    return out


def is_official(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(key.startswith(PREFIX) for key in state_dict)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local weight file: safetensors, or a torch pickle (weights only: a file that names
    anything but tensors and plain values is refused, since unpickling it could run code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise CheckpointError(f"cannot read {path}: not a safetensors file ({exc})") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickle.naming(path, exc) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    for wrapper in ("module", "model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    return loaded


def check_layout(model: NEPA, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """One error listing every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(state_dict[k].shape)} != {expected[k]}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != expected[k]
    )
    problems = [
        f"{label}: {', '.join(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        raise LayoutError(f"{source} does not fit the model: " + "; ".join(problems))


def load_state_dict(
    model: NEPA,
    state_dict: dict[str, torch.Tensor],
    source: str = "state dict",
    head: str = "strict",
    qk_norm: str = "strict",
) -> None:
    """Load ours or the official layout into ``model`` after a strict key/shape check.

    ``head="ignore"`` drops fc_norm/head from the source and keeps the model's own (fresh,
    zero-initialised) head: start fine-tuning from pretrained weights, or probe a classifier.
    """
    if head not in ("strict", "ignore"):
        raise ValueError(f"head must be 'strict' or 'ignore', not '{head}'")
    if qk_norm not in ("strict", "fill"):
        raise ValueError(f"qk_norm must be 'strict' or 'fill', not '{qk_norm}'")
    ours = from_official(state_dict) if is_official(state_dict) else dict(state_dict)
    if qk_norm == "fill":
        # A QK-LayerNorm without affine is one with weight 1: the released B fine-tuning config turns
        # the affine on over pretrained weights that have none.
        for key, value in model.state_dict().items():
            if re.fullmatch(r"blocks\.\d+\.attn\.[qk]_norm\.weight", key) and key not in ours:
                ours[key] = torch.ones_like(value)
    if head == "ignore":
        ours = {k: v for k, v in ours.items() if k not in HEAD_KEYS}
        ours.update({k: v for k, v in model.state_dict().items() if k in HEAD_KEYS})
    check_layout(model, ours, source)
    model.load_state_dict(ours, strict=True)


def load_weights(model: NEPA, path: str | Path, head: str = "strict", qk_norm: str = "strict") -> None:
    load_state_dict(model, read_state_dict(path), source=str(path), head=head, qk_norm=qk_norm)


def save_official(model_or_state: NEPA | dict[str, torch.Tensor], path: str | Path) -> None:
    state = model_or_state.state_dict() if isinstance(model_or_state, NEPA) else model_or_state
    official = {k: v.detach().contiguous().cpu() for k, v in to_official(state).items()}
    save_file(official, str(path), metadata={"format": "pt", "layout": "official-vit_nepa"})


def arch_from_official_config(config: dict | str | Path, **changes) -> NepaArch:
    """Our architecture from an official ``config.json`` (a path or the parsed dict)."""
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    act = config.get("hidden_act", "gelu")
    gated = bool(config.get("use_gated_mlp", False))
    if act not in ("gelu", "silu", "swish"):
        raise LayoutError(f"unsupported hidden_act '{act}' in official config")
    mlp = ("swiglu" if act in ("silu", "swish") else "geglu") if gated else "gelu"
    if config.get("qk_norm_bias"):
        raise LayoutError("qk_norm_bias=true is not supported (the released models have none)")
    labels = config.get("id2label") or {}
    is_classifier = "ViTNepaForImageClassification" in config.get("architectures", [])
    arch = NepaArch(
        image_size=config.get("image_size", 224),
        patch_size=config.get("patch_size", 16),
        in_chans=config.get("num_channels", 3),
        dim=config["hidden_size"],
        depth=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        mlp=mlp,
        mlp_hidden=config.get("intermediate_size"),
        qkv_bias=config.get("qkv_bias", True),
        qk_norm=config.get("qk_norm", False),
        qk_norm_affine=config.get("qk_norm_affine", False),
        layerscale_init=config.get("layerscale_value", 1e-5),
        norm_eps=config.get("layer_norm_eps", 1e-12),
        rope_theta=config.get("rope_theta", 100.0),
        rope_rescale=config.get("pos_embed_rescale"),
        init_std=config.get("initializer_range", 0.02),
        causal=config.get("is_causal", True),
        num_classes=len(labels) if is_classifier else 0,
        drop_path=config.get("drop_path_prob", 0.0),
    )
    return arch.replace(**changes) if changes else arch


def official_config(arch: NepaArch) -> dict:
    """The official ``config.json`` fields describing ``arch`` (for exported weights)."""
    if arch.mlp == "swiglu":
        act, gated = "silu", True
    else:
        act, gated = "gelu", arch.mlp == "geglu"
    config = {
        "model_type": "vit_nepa",
        "architectures": ["ViTNepaForImageClassification" if arch.num_classes else "ViTNepaForPreTraining"],
        "hidden_size": arch.dim,
        "num_hidden_layers": arch.depth,
        "num_attention_heads": arch.num_heads,
        "intermediate_size": arch.hidden,
        "hidden_act": act,
        "use_gated_mlp": gated,
        "image_size": arch.image_size,
        "patch_size": arch.patch_size,
        "num_channels": arch.in_chans,
        "layer_norm_eps": arch.norm_eps,
        "layerscale_value": arch.layerscale_init,
        "qkv_bias": arch.qkv_bias,
        "qk_norm": arch.qk_norm,
        "qk_norm_affine": arch.qk_norm_affine,
        "qk_norm_bias": False,
        "rope_theta": arch.rope_theta,
        "pos_embed_rescale": arch.rope_rescale,
        "pos_embed_shift": None,
        "pos_embed_jitter": None,
        "is_causal": arch.causal,
        "add_pooling_layer": True,
        "drop_path_prob": arch.drop_path,
        "initializer_range": arch.init_std,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    if arch.num_classes:
        config["id2label"] = {str(i): str(i) for i in range(arch.num_classes)}
    return config
