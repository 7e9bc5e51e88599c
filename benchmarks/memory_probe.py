"""Which CUDA tensors are alive after a gradient-release step, beyond params and optimizer state."""
import gc

import torch

import flashcompile as fc
from flashcompile.tools.bench_models import build
from flashcompile.tools.memory import _warm_up_libraries

dev = torch.device("cuda")
_warm_up_libraries(dev)
base = torch.cuda.memory_allocated()
model = fc.cast_model(build("gpt2_124m", dev))
opt = fc.AdamW(model.parameters(), lr=1e-4)
print("model", (torch.cuda.memory_allocated() - base) / 2**20)
h = fc.enable_gradient_release(model, opt)
print("+state", (torch.cuda.memory_allocated() - base) / 2**20)
for i in range(3):
    tokens = torch.randint(0, 50257, (4, 1025), device=dev)
    model(tokens).backward()
    opt.step()
    torch.cuda.synchronize()
    print("after step", i, (torch.cuda.memory_allocated() - base) / 2**20)
known = set()
for p in model.parameters():
    known.add(p.untyped_storage().data_ptr())
for st in opt.state.values():
    for t in st.values():
        known.add(t.untyped_storage().data_ptr())
extra = {}
for o in gc.get_objects():
    try:
        if isinstance(o, torch.Tensor) and o.is_cuda:
            s = o.untyped_storage()
            if s.data_ptr() not in known:
                extra[s.data_ptr()] = (s.nbytes(), tuple(o.shape), o.dtype)
    except Exception:
        pass
print("unknown live CUDA storages:", sorted(extra.values(), reverse=True)[:15])
print("sum MiB", sum(v[0] for v in extra.values()) / 2**20)
n = sum(p.numel() for p in model.parameters())
sizes = sum(t.untyped_storage().nbytes() for st in opt.state.values() for t in st.values() if t.is_cuda)
print("state MiB", sizes / 2**20, "params M", n / 1e6)
snap = torch.cuda.memory_snapshot()
blocks = [(b["size"], b.get("requested_size", 0)) for seg in snap for b in seg["blocks"] if b["state"] == "active_allocated"]
print("active blocks", len(blocks), "size MiB", sum(b[0] for b in blocks) / 2**20, "requested MiB", sum(b[1] for b in blocks) / 2**20)
h.remove()
