"""One process of a multi-process test run: `accelerate launch tests/dist_worker.py CONFIG.json` trains with the
config's values (hidden test hooks such as interrupt_at_step included), as `sdlora train` would."""

import json
import sys

from sdlora.training.config import make_config
from sdlora.training.loop import train

if __name__ == "__main__":
    result = train(make_config(None, **json.loads(open(sys.argv[1]).read())))
    sys.exit(130 if result.interrupted else 0)


def collectives(rank: int, world: int, port: int, out: str) -> None:
    """torch.multiprocessing.spawn target: the seam's collectives over gloo, results written to OUT/RANK.json."""
    import os

    import torch

    from sdlora.errors import SdloraError
    from sdlora.training.dist import GradBucket, current

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    d = current()
    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True), torch.zeros(2, requires_grad=True)]
    if rank == 0:  # params[0] gets a gradient on rank 0 only, params[1] on both, params[2] on neither
        params[0].grad, params[1].grad = torch.tensor([1.0, 2.0, 3.0]), torch.full((2, 2), 0.25)
    else:
        params[1].grad = torch.full((2, 2), 0.5)
    loss = GradBucket(params)(torch.tensor(0.75 if rank == 0 else 0.5))
    try:
        d.on_main(lambda: (_ for _ in ()).throw(SdloraError("refused on the main process")))
        verdict = None
    except SdloraError as e:
        verdict = str(e)
    result = {"any": [d.any(rank == 1), d.any(False)], "grads": [None if p.grad is None else p.grad.tolist() for p in params], "loss": loss.item(),
              "interleave": d.interleave(list(range(7))[rank::world]), "map": d.map(lambda i: i * i, 5),
              "on_main": d.on_main(lambda: "made once"), "verdict": verdict}
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()
