"""How exact the drop-in guarantee is: our optimizers without blocks against torch.optim, on fp32.

    python docs/dropin_precision.py

Trains the same small MLP (20-64-1, tanh, 200 mini-batch steps) with each pair and prints the largest
absolute parameter difference; the guide's table (docs/guide.md) quotes this output.
"""

import torch

from fused_lagrangian import LagrangianAdam, LagrangianAdamW, LagrangianSGD, backends

STEPS = 200


def train(make_optimizer) -> torch.Tensor:
    data = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 20, generator=data), torch.randn(256, 1, generator=data)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    optimizer = make_optimizer(model.parameters())
    for step in range(STEPS):
        rows = slice(step % 4 * 64, (step % 4 + 1) * 64)
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


PAIRS = {
    "Adam": (lambda p, b: LagrangianAdam(p, lr=1e-2, backend=b), lambda p: torch.optim.Adam(p, lr=1e-2)),
    "Adam(fused=True)": (lambda p, b: LagrangianAdam(p, lr=1e-2, backend=b),
                         lambda p: torch.optim.Adam(p, lr=1e-2, fused=True)),
    "AdamW": (lambda p, b: LagrangianAdamW(p, lr=1e-2, backend=b), lambda p: torch.optim.AdamW(p, lr=1e-2)),
    "SGD(momentum, nesterov)": (lambda p, b: LagrangianSGD(p, lr=1e-2, momentum=0.9, nesterov=True, backend=b),
                                lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True)),
}

if __name__ == "__main__":
    available = [name for name in ("reference", "native") if backends.unavailable_reason(name, "cpu") is None]
    print(f"torch {torch.__version__}, fp32, {STEPS} steps; max abs parameter difference against torch.optim")
    for label, (ours, theirs) in PAIRS.items():
        expected = train(theirs)
        for backend in available:
            difference = (train(lambda params: ours(params, backend)) - expected).abs().max().item()
            print(f"  torch.optim.{label:<24} {backend:<9} {difference:.1e}")
