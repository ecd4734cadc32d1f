"""The model zoo: causality, backends, stop-gradient, RoPE, official layout and numerics, counts, FLOPs."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from official_reference import official_forward, official_state_dict
from torch.utils.flop_counter import FlopCounterMode

from nepa_scale import flops
from nepa_scale.models import NEPA, LayoutError, count_params, create_model, get_arch, resolve_backend
from nepa_scale.models.official import (
    arch_from_official_config,
    load_state_dict,
    load_weights,
    save_official,
    to_official,
)
from nepa_scale.models.vit import Rope2D, apply_rope
from nepa_scale.objective import next_embedding_loss

SMALL = dict(image_size=16, patch_size=4, dim=48, depth=2, num_heads=2)


def small_model(attention: str = "math", **changes) -> NEPA:
    torch.manual_seed(0)
    model = create_model("nepa_tiny", attention=attention, **{**SMALL, **changes})
    with torch.no_grad():  # LayerScale 1e-5 would hide the blocks from every comparison
        for block in model.blocks:
            block.ls1.gamma.fill_(0.5)
            block.ls2.gamma.fill_(0.5)
    return model.eval()


# ----------------------------------------------------------------------------- causality


def _perturb_patch(images: torch.Tensor, patch_index: int, patch: int = 4) -> torch.Tensor:
    grid = images.shape[-1] // patch
    row, col = divmod(patch_index, grid)
    changed = images.clone()
    changed[..., row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] += 3.0
    return changed


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_causal_outputs_ignore_later_patches(backend):
    model = small_model(backend)
    images = torch.randn(2, 3, 16, 16)
    patch_index = 9  # token 10 ([CLS] is token 0)
    with torch.no_grad():
        before = model(images).prediction
        after = model(_perturb_patch(images, patch_index)).prediction
    token = patch_index + 1
    assert torch.equal(before[:, :token], after[:, :token])
    assert (before[:, token:] - after[:, token:]).abs().amax() > 1e-3


def test_bidirectional_outputs_see_later_patches():
    model = small_model("math", causal=False)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(images).prediction
        after = model(_perturb_patch(images, 9)).prediction
    assert (before[:, :10] - after[:, :10]).abs().amax() > 1e-3


def test_set_attention_switches_causality():
    model = small_model("math")
    model.set_attention(causal=False)
    assert not model.causal and all(not b.attn.causal for b in model.blocks)


# ----------------------------------------------------------------------------- backends


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_matches_math_outputs_and_gradients(causal):
    images = torch.randn(3, 3, 16, 16)
    results = {}
    for backend in ("math", "sdpa"):
        model = small_model(backend, causal=causal).train()
        torch.manual_seed(1)  # the same RoPE rescale draw
        out = model(images)
        next_embedding_loss(out.prediction, out.target).loss.backward()
        results[backend] = (out.prediction.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (out_m, grad_m), (out_s, grad_s) = results["math"], results["sdpa"]
    torch.testing.assert_close(out_s, out_m, atol=2e-5, rtol=1e-5)
    for name in grad_m:
        torch.testing.assert_close(grad_s[name], grad_m[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="xformers kernels need CUDA (no GPU on this machine)"
)
@pytest.mark.parametrize("causal", [True, False])
def test_xformers_matches_sdpa(causal):
    pytest.importorskip("xformers.ops", reason="xformers not installed")
    from nepa_scale.models.attention import sdpa_attention, xformers_attention, xformers_unavailable_reason

    reason = xformers_unavailable_reason("cuda", torch.bfloat16)
    if reason:
        pytest.skip(reason)
    q, k, v = (
        torch.randn(2, 4, 257, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    ref = sdpa_attention(q, k, v, causal)
    out = xformers_attention(q, k, v, causal)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def test_auto_backend_falls_back_to_sdpa_on_cpu(caplog):
    caplog.set_level("INFO")
    assert resolve_backend("auto", "cpu", torch.float32) == "sdpa"


def test_explicit_xformers_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="xformers.*cannot run"):
        resolve_backend("xformers", "cpu", torch.float32)


# ----------------------------------------------------------------------------- stop-gradient


def test_no_gradient_flows_through_the_target():
    prediction = torch.randn(2, 17, 8, requires_grad=True)
    target = torch.randn(2, 17, 8, requires_grad=True)
    next_embedding_loss(prediction, target).loss.backward()
    assert target.grad is None and prediction.grad is not None
    prediction.grad = None
    next_embedding_loss(prediction, target, stop_gradient=False).loss.backward()
    assert target.grad is not None and target.grad.abs().sum() > 0


def test_patch_embedding_learns_through_the_input_path_only():
    model = small_model("math").train()
    images = torch.randn(2, 3, 16, 16)

    def patch_grad(stop_gradient: bool, detach_everything: bool = False) -> torch.Tensor:
        model.zero_grad()
        torch.manual_seed(0)
        out = model(images)
        target = out.target.detach().clone() if detach_everything else out.target
        next_embedding_loss(out.prediction, target, stop_gradient=stop_gradient).loss.backward()
        return model.patch_embed.proj.weight.grad.clone()

    with_sg = patch_grad(True)
    assert with_sg.abs().sum() > 0  # the input path still trains the patch embedding
    torch.testing.assert_close(with_sg, patch_grad(False, detach_everything=True), rtol=0, atol=0)
    assert not torch.allclose(with_sg, patch_grad(False))  # the ablation lets gradient into the targets


def test_loss_shift_pairs_position_t_with_t_plus_1():
    target = torch.randn(1, 5, 4)
    prediction = torch.roll(target, shifts=-1, dims=1)  # a perfect next-embedding predictor
    assert next_embedding_loss(prediction, target).loss.item() == pytest.approx(-1.0, abs=1e-6)
    assert next_embedding_loss(prediction, target, shift=False).loss.item() > -0.9


# ----------------------------------------------------------------------------- RoPE


def test_rope_leaves_cls_untouched():
    rope = Rope2D(get_arch("nepa_tiny")).train()
    cos, sin = rope(4, 4, torch.device("cpu"))
    x = torch.randn(2, 3, 17, 64)
    rotated = apply_rope(x, cos, sin)
    assert torch.equal(rotated[:, :, 0], x[:, :, 0])
    assert not torch.allclose(rotated[:, :, 1:], x[:, :, 1:])


def test_rope_dot_product_depends_only_on_coordinate_difference():
    arch = get_arch("nepa_tiny", rope_rescale=None)
    rope = Rope2D(arch).eval()
    cos, sin = rope(4, 4, torch.device("cpu"))
    q0, k0 = torch.randn(arch.head_dim, dtype=torch.float64), torch.randn(arch.head_dim, dtype=torch.float64)
    q = apply_rope(q0.expand(17, -1), cos.double(), sin.double())
    k = apply_rope(k0.expand(17, -1), cos.double(), sin.double())
    # Patches (row, col) -> token 1 + 4*row + col. Same offset (+1 row, +2 cols) at two places:
    pairs = [((0, 0), (1, 2)), ((2, 1), (3, 3))]
    dots = [q[1 + 4 * a[0] + a[1]] @ k[1 + 4 * b[0] + b[1]] for a, b in pairs]
    assert dots[0].item() == pytest.approx(dots[1].item(), abs=1e-12)
    other = q[1] @ k[1 + 4 * 1 + 1]  # a different offset gives a different product
    assert abs(other.item() - dots[0].item()) > 1e-6


def test_bf16_rope_rotates_in_bf16_close_to_fp32_and_keeps_causality():
    """``rope_dtype: bf16`` (DINOv3's option): cos/sin and the rotation in bf16, within bf16's
    rounding of the fp32 rotation; the model's outputs stay close and causal."""
    arch = get_arch("nepa_tiny", rope_rescale=None)
    cos32, sin32 = Rope2D(arch).eval()(4, 4, torch.device("cpu"))
    cos16, sin16 = Rope2D(arch.replace(rope_dtype="bf16")).eval()(4, 4, torch.device("cpu"))
    assert cos16.dtype == sin16.dtype == torch.bfloat16 and cos32.dtype == torch.float32
    x = torch.randn(2, 3, 17, arch.head_dim).bfloat16()
    exact, rounded = apply_rope(x, cos32, sin32), apply_rope(x, cos16, sin16)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded[:, :, 0], x[:, :, 0])
    error = (rounded.float() - exact.float()).abs().max() / x.float().abs().max()
    assert 0 < error < 2**-6, error  # a few bf16 roundings, and not the fp32 path
    torch.manual_seed(0)
    fp32_model = NEPA(arch, attention="math").eval()
    bf16_model = NEPA(arch.replace(rope_dtype="bf16"), attention="math").eval()
    bf16_model.load_state_dict(fp32_model.state_dict())
    images = torch.randn(2, 3, arch.image_size, arch.image_size)
    a, b = fp32_model(images).prediction, bf16_model(images).prediction
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999 and not torch.equal(
        a, b
    )
    later = images.clone()
    later[..., arch.image_size // 2 :, :] = 0  # the bottom half of the patches
    prefix = arch.grid * arch.grid // 2
    assert torch.equal(bf16_model(later).prediction[:, :prefix], b[:, :prefix])
    with pytest.raises(ValueError, match="unknown rope_dtype 'fp16'"):
        arch.replace(rope_dtype="fp16")


def test_rope_rescale_only_in_train_mode():
    rope = Rope2D(get_arch("nepa_tiny"))
    device = torch.device("cpu")
    rope.eval()
    eval_a, eval_b = rope(4, 4, device)[0], rope(4, 4, device)[0]
    assert torch.equal(eval_a, eval_b)
    rope.train()
    train_a, train_b = rope(4, 4, device)[0], rope(4, 4, device)[0]
    assert not torch.equal(train_a, train_b) and not torch.equal(train_a, eval_a)
    # The factor is log-uniform in [1/2, 2]: recover it from the y-angle of patch 0 at the lowest
    # frequency (small enough that acos is unambiguous).
    k = rope.inv_freq.numel() - 1
    base_angle = abs(2 * math.pi * Rope2D.patch_centres(4, 4, device)[0, 0].item() * rope.inv_freq[k].item())
    factors = [torch.acos(rope(4, 4, device)[0][1, k]).item() / base_angle for _ in range(200)]
    assert 0.5 - 1e-3 <= min(factors) < 0.6 and 1.8 < max(factors) <= 2.0 + 1e-3
    assert abs(sum(math.log(f) for f in factors) / len(factors)) < 0.15  # symmetric in log space


# ----------------------------------------------------------------------------- official layout


LAYOUTS = [
    dict(dim=768, depth=12, heads=12, mlp=3072, patch=14, qk_affine=False, gated=False),  # B, as released
    dict(dim=48, depth=2, heads=2, mlp=96, patch=4, qk_affine=False, gated=False),
    dict(dim=48, depth=2, heads=2, mlp=96, patch=4, qk_affine=True, gated=False),
    dict(dim=48, depth=2, heads=2, mlp=80, patch=4, qk_affine=False, gated=True),
    dict(dim=48, depth=2, heads=2, mlp=80, patch=4, qk_affine=True, gated=True, classes=7),
]


def _config_for(layout: dict, image_size: int) -> dict:
    return {
        "hidden_size": layout["dim"],
        "num_hidden_layers": layout["depth"],
        "num_attention_heads": layout["heads"],
        "intermediate_size": layout["mlp"],
        "patch_size": layout["patch"],
        "image_size": image_size,
        "qk_norm": True,
        "qk_norm_affine": layout["qk_affine"],
        "use_gated_mlp": layout["gated"],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "rope_theta": 100.0,
        "pos_embed_rescale": 2.0,
        "is_causal": not layout.get("classes"),
        "architectures": [
            "ViTNepaForImageClassification" if layout.get("classes") else "ViTNepaForPreTraining"
        ],
        "id2label": {str(i): str(i) for i in range(layout.get("classes", 0))},
    }


@pytest.mark.parametrize(
    "layout",
    LAYOUTS,
    ids=lambda layout: (
        f"d{layout['dim']}-aff{layout['qk_affine']}-gated{layout['gated']}-cls{layout.get('classes', 0)}"
    ),
)
def test_official_layout_round_trip_is_exact(layout, tmp_path):
    image_size = 224 if layout["dim"] == 768 else 16
    official = official_state_dict(**layout)
    arch = arch_from_official_config(_config_for(layout, image_size))
    with torch.device("meta") if layout["dim"] == 768 else torch.device("cpu"):
        model = NEPA(arch, attention="math")
    model = model.to_empty(device="cpu")
    load_state_dict(model, official)
    exported = to_official(model.state_dict())
    assert set(exported) == set(official)
    for key, value in official.items():
        assert torch.equal(exported[key], value), key
    if layout["dim"] != 768:  # and through files: safetensors out, read back in
        save_official(model, tmp_path / "model.safetensors")
        again = NEPA(arch, attention="math")
        load_weights(again, tmp_path / "model.safetensors")
        assert all(
            torch.equal(a, b)
            for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
        )


@pytest.mark.parametrize("layout", LAYOUTS[1:4], ids=["plain", "qk-affine", "gated"])
def test_our_model_computes_what_the_official_layout_computes(layout):
    official = official_state_dict(**layout, scale=0.2)
    model = NEPA(arch_from_official_config(_config_for(layout, 16)), attention="math").eval()
    load_state_dict(model, official)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ours = model(images)
        ref_out, ref_z, ref_loss = official_forward(
            official, images, num_heads=layout["heads"], patch=layout["patch"]
        )
        loss = next_embedding_loss(ours.prediction, ours.target).loss
    torch.testing.assert_close(ours.target, ref_z, rtol=0, atol=0)
    torch.testing.assert_close(ours.prediction, ref_out, rtol=1e-5, atol=1e-5)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)


def test_classifier_pools_patch_tokens_like_the_official_head():
    layout = LAYOUTS[4]
    official = official_state_dict(**layout, scale=0.2)
    model = NEPA(arch_from_official_config(_config_for(layout, 16)), attention="sdpa").eval()
    load_state_dict(model, official)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(images)
        hidden, _, _ = official_forward(official, images, num_heads=2, patch=4, causal=False)
        pooled = torch.nn.functional.layer_norm(
            hidden[:, 1:].mean(1), (48,), official["fc_norm.weight"], official["fc_norm.bias"], 1e-12
        )
        expected = torch.nn.functional.linear(
            pooled, official["classifier.weight"], official["classifier.bias"]
        )
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_wrong_official_keys_fail_listing_every_offender():
    layout = LAYOUTS[1]
    official = official_state_dict(**layout)
    official.pop("vit_nepa.layernorm.bias")
    official["vit_nepa.encoder.layer.0.bogus.weight"] = torch.zeros(3)
    official["vit_nepa.encoder.layer.1.output.dense.bias"] = torch.zeros(5)
    model = NEPA(arch_from_official_config(_config_for(layout, 16)))
    with pytest.raises(LayoutError) as err:
        load_state_dict(model, official, source="test.safetensors")
    message = str(err.value)
    assert "\n" not in message
    assert "missing: norm.bias" in message
    assert "vit_nepa.encoder.layer.0.bogus.weight" in message
    assert "blocks.1.mlp.fc2.bias (5,) != (48,)" in message


def test_classifier_can_start_from_pretrained_weights():
    layout = LAYOUTS[1]
    official = official_state_dict(**layout)
    model = NEPA(arch_from_official_config(_config_for(layout, 16)).replace(num_classes=10, causal=False))
    with pytest.raises(LayoutError, match="missing: fc_norm.bias, fc_norm.weight, head.bias, head.weight"):
        load_state_dict(model, official)
    load_state_dict(model, official, head="ignore")
    assert torch.count_nonzero(model.head.weight) == 0  # the head stays zero-initialised


# ----------------------------------------------------------------------------- counts and FLOPs

RECIPE = {  # docs/recipe.md: params (GeLU MLP) and training GFLOP per 224-px image
    "nepa_s14": (22e6, 37e9),
    "nepa_b14": (86e6, 139e9),
    "nepa_l14": (304e6, 486e9),
    "nepa_h14": (632e6, 1.0e12),
}


@pytest.mark.parametrize("name", list(RECIPE))
def test_zoo_matches_the_recipe_table(name):
    arch = get_arch(name)
    with torch.device("meta"):
        model = NEPA(arch)
    real = sum(p.numel() for p in model.parameters())
    counts = count_params(arch)
    assert counts["total"] == real
    assert counts["without_patch_embed"] == real - sum(p.numel() for p in model.patch_embed.parameters())
    params, gflops = RECIPE[name]
    if name == "nepa_s14":
        # The table gives S as "about 22 M" (two digits); without position embedding or head it is 21.53 M.
        assert round(real / 1e6) == 22
    else:
        assert abs(real / params - 1) < 0.01
    assert abs(flops.train_flops_per_image(arch, "6N+attn") / gflops - 1) < 0.01


def test_released_parameter_counts_are_exact():
    assert count_params(get_arch("nepa_b14"))["total"] == 85_527_552
    assert count_params(get_arch("nepa_l14"))["total"] == 302_967_808
    # The released B fine-tuning config switches the qk-norm affine on (2 x 64 weights per layer).
    sft = get_arch("nepa_b14", num_classes=1000, causal=False, qk_norm_affine=True)
    assert count_params(sft)["total"] == 86_299_624


@pytest.mark.parametrize(
    "name,overrides", [("nepa_tiny", {}), ("nepa_b14", {"image_size": 56}), ("nepa_s14", {})]
)
def test_flops_agree_with_torch_flop_counter(name, overrides):
    arch = get_arch(name, **overrides)
    model = NEPA(arch, attention="math")  # the math backend materialises the full T x T attention
    images = torch.randn(2, 3, arch.image_size, arch.image_size)
    with FlopCounterMode(display=False) as counter:
        out = model(images)
        next_embedding_loss(out.prediction, out.target).loss.backward()
    measured = counter.get_total_flops() / 2
    assert abs(measured / flops.train_flops_per_image(arch, "6N+attn") - 1) < 0.02


def test_flop_conventions_are_ordered_and_named():
    arch = get_arch("nepa_l14")
    values = [flops.train_flops_per_image(arch, c) for c in ("6N", "6N+attn_causal", "6N+attn")]
    assert values == sorted(values)
    assert flops.mfu(400e12, 800e12) == 0.5
    with pytest.raises(ValueError, match="unknown FLOP convention 'bogus'"):
        flops.train_flops_per_image(arch, "bogus")


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: create_model("nepa_xxl"), "unknown model 'nepa_xxl'"),
        (lambda: create_model("nepa_tiny", image_size=18), "image_size 18 is not divisible by patch_size 4"),
        (lambda: create_model("nepa_tiny", attention="flash9"), "unknown attention backend 'flash9'"),
        (lambda: create_model("nepa_tiny", mlp="relu"), "unknown mlp 'relu'"),
    ],
)
def test_bad_arguments_give_one_line_errors(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_cli_lists_the_zoo():
    out = subprocess.run(
        [sys.executable, "-m", "nepa_scale.cli", "models"], capture_output=True, text=True, check=True
    )
    assert "nepa_b14" in out.stdout and "85,527,552" in out.stdout
