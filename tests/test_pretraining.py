"""A short plain-PyTorch pretraining of the zoo's nepa_tiny on real images (the bundled digits).

No DeepSpeed here: this checks the model and objective alone. The held-out loss must fall and the
targets must keep their spread. Floor for the spread: 0.5. At initialisation the digits' target
embeddings have a spread of about 0.95 (1 - mean pairwise cosine across positions); a collapsed run
drives it below 0.01 within a hundred steps (see test_engine's stop-gradient ablation), so 0.5 sits
far from both and cannot be reached by noise.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from nepa_scale.config import DataConfig
from nepa_scale.data import ResumableBatchSampler, build_dataset, collate, to_model_input
from nepa_scale.models import create_model
from nepa_scale.objective import next_embedding_loss


def held_out(model, loader) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        batch = next(iter(loader))
        out = model(to_model_input(batch.images, torch.device("cpu"), torch.float32))
        result = next_embedding_loss(out.prediction, out.target)
    model.train()
    return result.loss.item(), result.target_spread.item()


def test_nepa_tiny_learns_on_digits_without_collapse():
    torch.manual_seed(0)
    data = DataConfig(kind="digits", crop_scale=(0.35, 1.0), hflip=0.0)
    train_set = build_dataset(data, "train", 16, train=True)
    val_set = build_dataset(data, "val", 16, train=False)
    train = DataLoader(
        train_set, batch_sampler=ResumableBatchSampler(len(train_set), 64, 64), collate_fn=collate
    )
    val = DataLoader(val_set, batch_size=128, collate_fn=collate)
    model = create_model("nepa_tiny", attention="sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    start_loss, start_spread = held_out(model, val)
    steps = 0
    while steps < 40:
        for batch in train:
            out = model(to_model_input(batch.images, torch.device("cpu"), torch.float32))
            loss = next_embedding_loss(out.prediction, out.target).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            steps += 1
            if steps == 40:
                break
    end_loss, end_spread = held_out(model, val)
    assert start_spread > 0.9
    assert end_loss < start_loss - 0.2, (start_loss, end_loss)
    assert end_loss > -0.99 and end_spread > 0.5, (end_loss, end_spread)
