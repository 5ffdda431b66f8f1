"""The CPU NVFP4 backend (harness/quant/nvfp4_cpu.py) against ModelOpt's CUDA kernel, on the same tensors.

    python bench/nvfp4_cpu_vs_cuda.py        # needs a CUDA GPU and nvidia-modelopt

Each weight goes through a real ModelOpt quantizer (W4A16_NVFP4_CFG, calibrated amax) on the GPU,
and through nvfp4_fake_quant on the CPU with the same amax; prints max and mean |difference|.
"""

import torch


def main() -> None:
    import modelopt.torch.quantization as mtq

    from harness.quant.nvfp4_cpu import nvfp4_fake_quant

    torch.manual_seed(0)
    print("shape, dtype, max |cuda - cpu|, mean |cuda - cpu|, mean |quantization error|")
    for dtype in (torch.float32, torch.bfloat16):
        for out_f, in_f in ((128, 128), (256, 512), (1024, 4096), (4096, 1024)):
            layer = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False)).to("cuda", dtype)
            x = torch.randn(8, in_f, device="cuda", dtype=dtype)
            mtq.quantize(layer, mtq.W4A16_NVFP4_CFG, lambda m: m(x))
            q = layer[0].weight_quantizer
            with torch.no_grad():
                cuda = q(layer[0].weight).float().cpu()
                cpu = nvfp4_fake_quant(layer[0].weight.detach().cpu(), q.amax.detach().cpu()).float()
            diff = (cuda - cpu).abs()
            err = (cuda - layer[0].weight.float().cpu()).abs().mean()
            print(f"{out_f}x{in_f}, {str(dtype).removeprefix('torch.')}, {diff.max().item():.3e}, "
                  f"{diff.mean().item():.3e}, {err.item():.3e}")


if __name__ == "__main__":
    main()
