"""AdamW with its state keyed by structured parameter names, so a run can be saved and resumed exactly.

NOTE(port): not ``paddle.optimizer.AdamW``: Paddle keys its state by per-process generated names and
restores it lazily, asserting on any accumulator missing from the loaded state. A routed expert that
received no token before a checkpoint has no state yet, so resuming failed with "Optimizer set error,
lo_ra_linear_333.w_0_moment1_0 should in state dict" as soon as that expert was used; with bf16 master
weights the keys are derived from the master copies' generated names as well. The update is the same
(decoupled weight decay, bias-corrected moments; verified against NumPy in tests/test_finetune.py).

Which parameters received a gradient in a step is recorded by gradient hooks: Paddle's cleared
gradients stay as zero tensors, so ``param.grad is None`` cannot tell an expert that got no token from
one that did.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Set, Tuple

import paddle

__all__ = ["AdamW"]

NamedParams = List[Tuple[str, paddle.Tensor]]


class AdamW:
    """``p <- p * (1 - lr * wd) - lr * m_hat / (sqrt(v_hat) + eps)`` per parameter that has a gradient.

    Moments are float32; a bfloat16/float16 parameter is updated through a float32 master copy so small
    steps are not rounded away. Parameters that received no gradient since the last ``clear_grad``
    (experts no token was routed to) are left alone, their step counts included, as torch does.

    Args:
        params: ``[(structured name, parameter)]``.
        decays: tells from the structured name whether weight decay applies.
    """

    def __init__(
        self,
        params: NamedParams,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        weight_decay: float = 0.0,
        decays: Callable[[str], bool] = lambda name: True,
    ):
        self.params = list(params)
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.weight_decay = {name: weight_decay if decays(name) else 0.0 for name, _ in self.params}
        self.exp_avg: Dict[str, paddle.Tensor] = {}
        self.exp_avg_sq: Dict[str, paddle.Tensor] = {}
        self.master: Dict[str, paddle.Tensor] = {}
        self.steps: Dict[str, int] = {}
        self.touched: Set[str] = set()
        for name, param in self.params:
            param.register_hook(self._recorder(name))

    def _recorder(self, name: str) -> Callable[[paddle.Tensor], None]:
        def record(grad: paddle.Tensor) -> None:
            self.touched.add(name)

        return record

    def sync_touched(self) -> None:
        """Data-parallel runs: a parameter counts as updated when any process gave it a gradient, so
        every replica takes the same step (the trainer averages the gradients themselves)."""
        flags = paddle.to_tensor([int(name in self.touched) for name, _ in self.params], dtype=paddle.int32)
        paddle.distributed.all_reduce(flags, op=paddle.distributed.ReduceOp.MAX)
        self.touched = {name for (name, _), flag in zip(self.params, flags.tolist()) if flag}

    @paddle.no_grad()
    def step(self, lr: float) -> None:
        for name, param in self.params:
            if name not in self.touched:
                continue
            grad = param.grad.astype(paddle.float32)
            if name not in self.exp_avg:
                self.exp_avg[name] = paddle.zeros_like(grad)
                self.exp_avg_sq[name] = paddle.zeros_like(grad)
                self.steps[name] = 0
                if param.dtype != paddle.float32:
                    self.master[name] = param.astype(paddle.float32)
            t = self.steps[name] = self.steps[name] + 1
            m = self.exp_avg[name] = self.beta1 * self.exp_avg[name] + (1.0 - self.beta1) * grad
            v = self.exp_avg_sq[name] = self.beta2 * self.exp_avg_sq[name] + (1.0 - self.beta2) * grad * grad
            weights = self.master.get(name, param)
            denominator = (v / (1.0 - self.beta2 ** t)).sqrt() + self.epsilon
            updated = weights * (1.0 - lr * self.weight_decay[name]) - (lr / (1.0 - self.beta1 ** t)) * m / denominator
            if name in self.master:
                self.master[name] = updated
                paddle.assign(updated.astype(param.dtype), output=param)
            else:
                paddle.assign(updated, output=param)

    def clear_grad(self) -> None:
        self.touched.clear()
        for _, param in self.params:
            param.clear_gradient(set_to_zero=True)

    def state_dict(self) -> Dict[str, paddle.Tensor]:
        """``{"<name>/exp_avg", "<name>/exp_avg_sq", "<name>/step" (int64 [1]), "<name>/master"}`` for
        every parameter that has been updated."""
        state = {}
        for name in self.exp_avg:
            state[f"{name}/exp_avg"] = self.exp_avg[name]
            state[f"{name}/exp_avg_sq"] = self.exp_avg_sq[name]
            state[f"{name}/step"] = paddle.to_tensor([self.steps[name]], dtype=paddle.int64)
            if name in self.master:
                state[f"{name}/master"] = self.master[name]
        return state

    def set_state_dict(self, state: Dict[str, paddle.Tensor]) -> None:
        """Restore ``state_dict()`` output; raises ValueError for state of a parameter this run does not train."""
        shapes = {name: list(param.shape) for name, param in self.params}
        self.exp_avg, self.exp_avg_sq, self.master, self.steps = {}, {}, {}, {}
        for key, value in state.items():
            name, _, field = key.rpartition("/")
            if name not in shapes:
                raise ValueError(
                    f"optimizer state for {name!r}, which does not train in this run; resume with the same settings"
                )
            if field == "step":
                self.steps[name] = int(value.reshape([-1])[0])
                continue
            if list(value.shape) != shapes[name]:
                raise ValueError(f"optimizer state {key} has shape {list(value.shape)}, the parameter {shapes[name]}")
            target = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "master": self.master}[field]
            target[name] = value.astype(paddle.float32)
