"""ViT-B/32 policies with CIM-AQ's attention rows: priced with --include-attention, refused by finetuning."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import finetune
from lib.layer_trace import build_recording_order, construction_order
from lib.policy import Policy, PolicyError
from lib.simulator import trace_layer_dims
from lib.simulator.attention import refuse_attention_rows
from lib.simulator.latency import main as latency_main

ROOT = Path(__file__).resolve().parents[1]
CIM_AQ_HW = ROOT / "run" / "hardware" / "cim_aq_default.yaml"
VIT = ["--arch", "vit_b_32", "--num-classes", "1000", "--input-size", "224", "--hardware", str(CIM_AQ_HW)]
TOKENS, EMBED, HEADS, HEAD_DIM, MLP = 50, 768, 12, 64, 3072  # ViT-B/32 at 224: 7x7 patches + class token

# CIM-AQ's ViT-B/32 rows (its layer-dimensions file): (m, n, invocations, repeat) of the patch conv,
# then per block in_proj, Q·Kᵀ, A·V, out_proj, mlp.0, mlp.3, then the head: 1 + 12·6 + 1 = 74 rows.
BLOCK = [(3 * EMBED, EMBED, TOKENS, 1), (TOKENS, HEAD_DIM, TOKENS, HEADS), (HEAD_DIM, TOKENS, TOKENS, HEADS),
         (EMBED, EMBED, TOKENS, 1), (MLP, EMBED, TOKENS, 1), (EMBED, MLP, TOKENS, 1)]
CIM_AQ_ROWS = [(EMBED, 32 * 32 * 3, 49, 1)] + BLOCK * 12 + [(1000, EMBED, 1, 1)]


def cim_aq_latency(m: int, n: int, invocations: int, repeat: int, w_bit: int, a_bit: int) -> float:
    """CIM-AQ's latency formula on its default crossbar (256x256, 4-bit cells, 1-bit inputs, dc mapping)."""
    writes = math.ceil(2 * m / 256 * math.ceil(w_bit / 4)) * math.ceil(n / 256)
    executes = invocations * writes * a_bit
    return repeat * (writes * 56 + executes * 1.4)


@pytest.fixture(scope="module")
def cim_aq_vit_policy(tmp_path_factory) -> Path:
    """A 74-row ViT-B/32 policy as CIM-AQ writes it: neighbouring rows differ, ends at 8/8."""
    rows = [[8, 8]] + [[2 + k % 7, 3 + k % 6] for k in range(72)] + [[8, 8]]
    path = tmp_path_factory.mktemp("vit") / "policy-vitb32.npy"
    np.save(path, np.asarray(rows, dtype=np.float64))
    return path


def test_vit_b_32_policy_with_attention_rows_is_priced_as_cim_aq_prices_it(cim_aq_vit_policy, tmp_path, capsys):
    report_file = tmp_path / "report.json"
    code = latency_main(VIT + ["--include-attention", "--policy", str(cim_aq_vit_policy), "--json", str(report_file)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(report_file.read_text())
    traced = [(layer["m"], layer["n"], layer["invocations"], layer["repeat"]) for layer in report["layers"]]
    assert traced == CIM_AQ_ROWS
    bits = np.load(cim_aq_vit_policy).astype(int)
    per_row = [cim_aq_latency(*dims, w, a) for dims, (w, a) in zip(CIM_AQ_ROWS, bits)]
    priced = report["policy"]["per_layer"]
    assert [row["latency"] for row in priced] == pytest.approx(per_row, rel=1e-12)
    assert report["policy"]["total_latency_us"] == pytest.approx(sum(per_row), rel=1e-12)
    baseline = sum(cim_aq_latency(*dims, 8, 8) for dims in CIM_AQ_ROWS)
    assert report["policy"]["ratio"] == pytest.approx(sum(per_row) / baseline, rel=1e-12)
    names = [layer["name"] for layer in report["layers"]]
    assert names[1:5] == [f"encoder.layers.encoder_layer_0.self_attention.{part}"
                          for part in ("in_proj", "qk_matmul", "av_matmul", "out_proj")]


def test_latency_cli_without_include_attention_names_the_attention_rows(cim_aq_vit_policy, capsys):
    assert latency_main(VIT + ["--policy", str(cim_aq_vit_policy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "74 rows: the model's 26 Conv2d/Linear layers plus 48 attention rows" in err
    assert "encoder.layers.encoder_layer_0.self_attention.qk_matmul" in err and "--include-attention" in err


def test_finetune_refuses_a_policy_with_attention_rows_before_training(cim_aq_vit_policy, tmp_path, capsys,
                                                                      eager_single_thread):
    out = tmp_path / "refused"
    code = finetune.main(["--arch", "vit_b_32", "--dataset", "digits-small", "--input-size", "224", "--workers", "0",
                          "--policy", str(cim_aq_vit_policy), "--epochs", "1", "--no-progress",
                          "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "74 rows: the model's 26 Conv2d/Linear layers plus 48 attention rows" in err
    assert "self_attention.in_proj" in err and "self_attention.qk_matmul" in err
    assert "finetuning quantizes only the Conv2d/Linear modules" in err
    assert not (out / "checkpoint.pth.tar").exists() and not (out / "args.json").exists()


class _LateAttention(nn.Module):
    """Builds its layers in another order than it calls them: post, attention, pre."""

    def __init__(self):
        super().__init__()
        self.post = nn.Linear(16, 10)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.pre = nn.Linear(16, 16)

    def forward(self, x):
        x = self.pre(x)
        return self.post(self.attn(x, x, x, need_weights=False)[0])


def test_attention_rows_rank_by_when_the_attention_was_built():
    model, ranks = build_recording_order(_LateAttention)
    dims = trace_layer_dims(model, example_input=torch.zeros(1, 6, 16), include_attention=True)
    order = construction_order([d.name for d in dims], ranks)
    parts = ["attn.in_proj", "attn.qk_matmul", "attn.av_matmul", "attn.out_proj"]
    assert order.call == ("pre", *parts, "post")
    assert order.construction == ("post", *parts, "pre")


def test_named_json_policy_with_attention_rows_is_refused_for_a_model_with_attention():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=10)
    dims = trace_layer_dims(vit, 32, include_attention=True)
    with pytest.raises(PolicyError, match=r"8 rows: the model's 4 Conv2d/Linear layers plus 4 attention rows "
                                          r".*self_attention\.in_proj, .*self_attention\.qk_matmul"):
        refuse_attention_rows(Policy.uniform([d.name for d in dims], 8, 8), vit, 32, "policy 'p.json'")
    plain = [d.name for d in dims if d.quantizable]
    refuse_attention_rows(Policy.uniform(plain, 8, 8), vit, 32)  # Conv2d/Linear rows only: accepted
    refuse_attention_rows(Policy.uniform(4, 8, 8), vit, 32)
    with pytest.raises(PolicyError, match="plus 4 attention rows"):  # unnamed: told apart by the row count
        refuse_attention_rows(Policy.uniform(8, 8, 8), vit, 32)
