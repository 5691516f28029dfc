import sys, torch
sys.path.insert(0, "src")
from cggr.functional import cggr_cross_entropy
x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
t = torch.randint(0, 256, (64,), device="cuda")
def step():
    cggr_cross_entropy(x, t, 0.25, check_targets=False).backward()
    x.grad = None
def plain():
    y = (x.float() * 2).sum(); y.backward(); x.grad = None
for name, fn, one in [("cggr default", step, False), ("cggr one thread", step, True), ("plain default", plain, False)]:
    for _ in range(50): fn()
    torch.cuda.synchronize()
    with torch.autograd.set_multithreading_enabled(not one):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(50): fn()
    print(name)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=45))
