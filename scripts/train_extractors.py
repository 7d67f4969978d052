"""Train the domain feature extractors shipped in fastdiff/assets/extractors/ (CNN classifiers; features = penultimate layer).

    python scripts/train_extractors.py                 # both, into fastdiff/assets/extractors/{digits,fashion-mnist}
    python scripts/train_extractors.py --only digits --out /tmp/extractors

Records the test accuracy, the command and the wall time in each folder's config.json.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastdiff.datasets import load_digits, load_fashion_mnist, make_loader
from fastdiff.eval.assets import ASSETS
from fastdiff.eval.extractors import ClassifierConfig, DomainClassifier

PLANS = {  # data set -> (loader, image size, epochs)
    "digits": (load_digits, 8, 60),
    "fashion-mnist": (load_fashion_mnist, 28, 8),
}


@torch.no_grad()
def accuracy(model, data, batch_size=1000):
    model.eval()
    hits = sum((model(x).argmax(1) == y).sum().item() for x, y in make_loader(data, batch_size, shuffle=False, drop_last=False))
    return hits / len(data)


def train(name, out, seed=0):
    load, size, epochs = PLANS[name]
    train_set, test_set = load("train"), load("test")
    torch.manual_seed(seed)
    model = DomainClassifier(ClassifierConfig(channels=1, size=size, num_classes=10))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loader = make_loader(train_set, 128, seed=seed)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * len(loader))
    start = time.time()
    for _ in tqdm(range(epochs), desc=f"extractor {name}"):
        model.train()
        for x, y in loader:
            # small random shifts make the features robust to what generators get slightly wrong
            x = torch.roll(x, shifts=tuple(torch.randint(-1, 2, (2,)).tolist()), dims=(2, 3))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    acc = accuracy(model, test_set)
    folder = model.save(
        Path(out) / name,
        test_accuracy=round(acc, 4),
        trained_on=f"{name} train split ({len(train_set)} images), {epochs} epochs, batch 128, AdamW 2e-3 one-cycle, seed {seed}",
        wall_minutes=round((time.time() - start) / 60, 2),
        command=" ".join(["python", *sys.argv]),
    )
    print(f"{name}: test accuracy {acc:.4f} -> {folder}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(PLANS), help="train one extractor")
    parser.add_argument("--out", default=str(ASSETS / "extractors"), help="folder for the extractor folders")
    args = parser.parse_args()
    for name in [args.only] if args.only else sorted(PLANS):
        train(name, args.out)


if __name__ == "__main__":
    main()
