"""Run under torchrun (or plain python): two optimizer steps of the real trainer step on a fixed global batch, each
rank taking its slice, and rank 0 saving the parameters, the loss state and the number of gradient all-reduce calls
per step. The test compares 1 and 2 processes, with and without DGA chunks (``--accum-freq``).

``--float64`` (first after the loss name) builds the model, the batch, the identity head and the loss tables in float64:
the equality tests run so, because after an AdamW step a rounding-level gradient difference on an entry whose gradient
is near AdamW's eps becomes a parameter difference of up to lr x (noise / eps), which in float32 is ~1e-5 and passes
or fails with the CPU's kernels; in float64 it is ~1e-13."""
import sys


import torch

from fast_clip.losses import build_loss
from fast_clip.model import create_model, get_tokenizer
from training import distributed as du
from training.optim import build_optimizer, set_lr
from training.params import parse_args
from training.objective import Objective, TrainModule
from training.step import train_step

out_path, loss_name = sys.argv[1], sys.argv[2]
float64 = sys.argv[3:4] == ["--float64"]
if float64:
    del sys.argv[3]
    torch.set_default_dtype(torch.float64)
B, STEPS = 8, 2
cfg = parse_args(["--train-data", "unused", "--model", "PersonTiny", "--loss", loss_name, "--local-loss",
                   "--data_size", "32"] + sys.argv[3:])
env = du.init_distributed("cpu")
torch.manual_seed(0)
model = create_model("PersonTiny")
loss_fn = build_loss(cfg.loss, data_size=32, device=env.device,
                     dtype=torch.float64 if float64 else torch.float32)
if loss_fn.initial_logit_scale() is not None:
    with torch.no_grad():
        model.logit_scale.fill_(loss_fn.initial_logit_scale())
model.logit_scale.requires_grad_(loss_fn.learns_model_temperature)
loss_fn.set_epoch(1)  # past epoch 0 so that the estimators' moving average (gamma < 1) is exercised

id_head, id_cfg = None, None
if cfg.id.enabled:  # 8 identities: pid = key // 4
    from fast_clip.id_head import ArcFaceHead, LinearIdHead
    id_head = (LinearIdHead(8, model.visual.output_dim) if cfg.id.kind == "linear" else
               ArcFaceHead(8, model.visual.output_dim, subcenters=cfg.id.arcface_subcenters))
    id_cfg = cfg.id
module = TrainModule(model, id_head)
opt = build_optimizer(module, lr=1e-3, wd=0.1, head_lr_mult=cfg.id.head_lr_mult)
objective = Objective(loss_fn, id_cfg)
reduce_calls = []
if env.distributed:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    ddp = torch.nn.parallel.DistributedDataParallel(module)

    def counting_hook(state, bucket):  # the default all-reduce, counted
        reduce_calls[-1] += 1
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
else:
    ddp = module
tok = get_tokenizer("PersonTiny")
colours = ["red", "blue", "green", "black", "white", "pink", "grey", "yellow"]
for step in range(STEPS):
    g = torch.Generator().manual_seed(100 + step)
    images = torch.randn(B, 3, 64, 32, generator=g)
    texts = tok([f"a person in a {colours[(i + step) % 8]} coat and {colours[(3 * i) % 8]} shoes" for i in range(B)])
    keys = torch.randperm(32, generator=g)[:B]
    lo, hi = env.rank * B // env.world_size, (env.rank + 1) * B // env.world_size
    batch = {"images": images[lo:hi], "texts": texts[lo:hi], "keys": keys[lo:hi], "pids": keys[lo:hi] // 4}
    set_lr(opt, 1e-3, loss_fn.temperature_lr(1e-3, float(1 / model.logit_scale.exp())))
    reduce_calls.append(0)
    out = train_step(ddp, objective, opt, batch, env.device, accum_chunks=cfg.optim.accum_chunks)
    assert not out["skipped"], out
if env.is_main:
    torch.save({"model": model.state_dict(), "loss": loss_fn.state_dict(), "reduce_calls": reduce_calls,
                "id_head": id_head.state_dict() if id_head is not None else None}, out_path)
du.destroy_distributed()
