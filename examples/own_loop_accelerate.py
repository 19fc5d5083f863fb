"""examples/own_loop.py under Hugging Face Accelerate: MGD in your own loop, one process or several.

    python examples/own_loop_accelerate.py                           # one process
    accelerate launch --num_processes 2 examples/own_loop_accelerate.py
    torchrun --nproc_per_node 2 examples/own_loop_accelerate.py      # the same, launched by torchrun

Accelerate shards the loaders and wraps ``kd.module`` (the student's capture + the distiller) in DDP;
featkd sees the process group and sums MGD's matching statistics over the ranks, so every rank solves the
same matching.
"""

import hashlib

import torch
from accelerate import Accelerator
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from featkd import Distillation, create_model
from featkd.engine.checkpoint import load_model_weights
from featkd.models.zoo import resolve_weights

accelerator = Accelerator(cpu=not torch.cuda.is_available())
torch.manual_seed(0)  # the same initial student on every rank
digits = load_digits()  # 8x8 images, values 0..16; the split and normalisation featkd's zoo teacher was trained on
x = (torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16 - 0.3052) / 0.3760
y = torch.tensor(digits.target)
train, test = train_test_split(range(len(y)), test_size=450, stratify=digits.target, random_state=0)
train_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=32, shuffle=True, drop_last=True)
stats_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=256)  # MGD's matching statistics

teacher = create_model("resnet20", num_classes=10, in_channels=1).to(accelerator.device)
load_model_weights(teacher, resolve_weights("zoo:digits-resnet20"))
student = create_model("resnet8", num_classes=10, in_channels=1).to(accelerator.device)
train_loader, stats_loader = accelerator.prepare(train_loader, stats_loader)  # this rank's shards
pairs = [["layer1.0.add", "layer1.2.add"], ["layer2.0.add", "layer2.2.add"], ["layer3.0.add", "layer3.2.add"]]
kd = Distillation(teacher, student, "mgd", {"pairs": pairs, "normalizer": "scaled"},
                  example_input=x[:2].to(accelerator.device), train_loader=stats_loader, epochs=2,
                  log=accelerator.print)
optimizer = torch.optim.SGD(kd.module.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
kd.module, optimizer = accelerator.prepare(kd.module, optimizer)

for epoch in range(2):
    kd.on_epoch_start(epoch)
    student.train()
    for xb, yb in train_loader:
        losses = kd(xb, yb)  # {"ce": ..., "mgd": ...}, already weighted
        loss = sum(losses.values())
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        kd.on_step_end()
    kd.on_epoch_end(epoch)
    student.eval()
    with torch.no_grad():
        xt, yt = x[test].to(accelerator.device), y[test].to(accelerator.device)
        acc = (student(xt).argmax(1) == yt).float().mean().item() * 100
    terms = ", ".join(f"{k} {v.item():.4f}" for k, v in losses.items())
    accelerator.print(f"epoch {epoch + 1}: loss {loss.item():.4f} ({terms})  test_acc {acc:.2f}")
groups = [v for k, v in kd.state_dict().items() if k.endswith("_groups")]  # the matching, per stage
digest = hashlib.sha256(b"".join(g.cpu().numpy().tobytes() for g in groups)).hexdigest()[:16]
print(f"rank {accelerator.process_index}: matching {digest}")
