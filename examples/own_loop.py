"""MGD inside your own training loop (featkd.Distillation, no featkd Trainer): digits, ResNet-20 -> ResNet-8."""

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from featkd import Distillation, create_model
from featkd.engine.checkpoint import load_model_weights
from featkd.models.zoo import resolve_weights

torch.manual_seed(0)
digits = load_digits()  # 8x8 images, values 0..16; the split and normalisation featkd's zoo teacher was trained on
x = (torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16 - 0.3052) / 0.3760
y = torch.tensor(digits.target)
train, test = train_test_split(range(len(y)), test_size=450, stratify=digits.target, random_state=0)
train_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True, drop_last=True)
stats_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=256)  # MGD's matching statistics

teacher = create_model("resnet20", num_classes=10, in_channels=1)
load_model_weights(teacher, resolve_weights("zoo:digits-resnet20"))
student = create_model("resnet8", num_classes=10, in_channels=1)
pairs = [["layer1.0.add", "layer1.2.add"], ["layer2.0.add", "layer2.2.add"], ["layer3.0.add", "layer3.2.add"]]
kd = Distillation(teacher, student, "mgd", {"pairs": pairs, "normalizer": "scaled"}, example_input=x[:2],
                  train_loader=stats_loader, epochs=2)
optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.05, momentum=0.9, weight_decay=5e-4)

for epoch in range(2):
    kd.on_epoch_start(epoch)
    student.train()
    for xb, yb in train_loader:
        losses = kd(xb, yb)  # {"ce": ..., "mgd": ...}, already weighted
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        kd.on_step_end()
    kd.on_epoch_end(epoch)
    student.eval()
    with torch.no_grad():
        acc = (student(x[test]).argmax(1) == y[test]).float().mean().item() * 100
    terms = ", ".join(f"{k} {v.item():.4f}" for k, v in losses.items())
    print(f"epoch {epoch + 1}: loss {loss.item():.4f} ({terms})  test_acc {acc:.2f}")
