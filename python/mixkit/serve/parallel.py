"""`mixkit serve --tp N` under torchrun: rank 0 serves HTTP and runs the
engine; before every step it broadcasts the requests added and aborted since
the last one (seeds included), and every other rank applies them to its own
engine and steps with it. The engines then schedule the same batches, run
their shards of the same forward (the tensor-parallel layers all-reduce
inside it) and sample the same tokens from the same all-gathered logits."""
from __future__ import annotations

import torch.distributed as dist


class Leader:
    def __init__(self, mesh):
        self.group = mesh.get_group()
        self.src = dist.get_global_rank(self.group, 0)

    def send(self, commands: list, stop: bool = False) -> None:
        dist.broadcast_object_list([(commands, stop)], src=self.src, group=self.group)


class Follower:
    def __init__(self, engine, mesh):
        self.engine = engine
        self.group = mesh.get_group()
        self.src = dist.get_global_rank(self.group, 0)

    def run(self) -> None:
        engine = self.engine
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=self.src, group=self.group)
            commands, stop = box[0]
            for cmd in commands:
                if cmd[0] == "add":
                    try:
                        engine.add(cmd[2], cmd[3], rid=cmd[1])
                    except ValueError:
                        pass  # rank 0 refused it too
                else:
                    engine.abort(cmd[1])
            if stop:
                return
            if engine.has_work():
                engine.step()
