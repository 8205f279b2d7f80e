"""Trains a small MLP on a synthetic regression task with torchopt_ext's
AdamW and a torch.optim StepLR schedule; prints the loss as it falls."""

import argparse

import torch

import torchopt_ext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)

    # Target: a smooth nonlinear function of the inputs.
    inputs = torch.randn(512, 16)
    targets = torch.sin(inputs @ torch.randn(16, 8)).sum(1, keepdim=True)

    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 1),
    )
    optimizer = torchopt_ext.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.5)

    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step == 1 or step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.6f}  lr {optimizer.param_groups[0]['lr']:.2e}")


if __name__ == "__main__":
    main()
