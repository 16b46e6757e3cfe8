"""The H200 figures of 2026-12-02 whose JSON files were lost with the lent machine (an earlier session's results
folder did not come back), written from that run's printed tables so the README can cite a committed file.

Each report says so in `provenance`; every figure here was printed by the command named in `command` on an NVIDIA
H200 through MLX 0.32.4's CUDA backend, with diffusers 0.42.1 (torch 2.11, CUDA) and mflux 0.24.0 in the same
call. Running that command again on the card rewrites the reports with the runs' own files.

    python benchmarks/transcribed_h200.py      # writes assets/bench/{restructure,lightning}_h200.{json,png}
"""

import json

from common import ASSETS, chart

DEVICE = "NVIDIA H200 (cuda)"
DATE = "2026-12-02"
PROVENANCE = (
    "transcribed from the printed tables of the run named in `command` (2026-12-02, lent NVIDIA H200); the run's "
    "own JSON files were lost with the machine. Rerun the command on the card to replace this file."
)

REPORTS = {
    "restructure_h200": dict(
        command="bash benchmarks/gpu_campaign.sh restructure (bench_vs_mflux.py --before .before, bench_pipeline.py)",
        config=dict(
            height=1024,
            width=1024,
            dtype="bfloat16",
            weights="random, full-size configs (20B transformer, 7B text encoder)",
            text_tokens=128,
            what="the pipeline restructure (issue 'The pipeline as parts') against the code before it",
        ),
        results={
            "forward qwen_nb (after)": dict(median_s=0.15647),
            "forward qwen_nb (before restructure)": dict(median_s=0.15808),
            "forward mflux 0.24.0": dict(median_s=0.21939),
            "generation qwen_nb (after), 20 steps CFG": dict(
                median_s=6.708, text_s=0.125, step_s=0.326, decode_s=0.054, peak_gb=29.56
            ),
            "generation qwen_nb (before restructure)": dict(median_s=6.635, peak_gb=29.79),
            "generation diffusers 0.42.1": dict(median_s=7.295, peak_gb=62.23),
        },
        notes=(
            "One transformer forward at 1024x1024, 60 blocks, bf16, the same arrays for the three models (paired: "
            "after/before 1.006x, qwen_nb 1.36x mflux's speed). Whole generation: text, 20 CFG steps, decode. The "
            "'before' generation ran in a separate call of the same session (within about 1% of 'after')."
        ),
    ),
    "lightning_h200": dict(
        command="bash benchmarks/gpu_campaign.sh fast (bench_pipeline.py --fast 8|4 --lora-rank 64) and fast_variants",
        config=dict(
            height=1024,
            width=1024,
            dtype="bfloat16",
            cfg_scale=1.0,
            lora="random rank-64 LoRA on every linear of the transformer, fused (qwen_nb) / fused with peft (diffusers)",
            schedule="Lightning: base_shift = max_shift = ln 3, exponential time shift, no terminal shift",
            weights="random, full-size configs",
        ),
        results={
            "qwen_nb 8 steps + LoRA": dict(median_s=1.466, step_s=0.169, peak_gb=31.46),
            "diffusers 8 steps + LoRA": dict(median_s=1.603, step_s=0.180, peak_gb=62.23),
            "qwen_nb 4 steps + LoRA": dict(median_s=0.847, step_s=0.177),
            "diffusers 4 steps + LoRA": dict(median_s=0.897, step_s=0.184),
            "qwen_nb 8 steps, no LoRA": dict(median_s=1.435, step_s=0.166, peak_gb=29.43),
            "qwen_nb 8 steps, 8-bit + LoRA as adapters": dict(median_s=3.996, step_s=0.482, peak_gb=31.42),
            "qwen_nb 8 steps, 4-bit + LoRA as adapters": dict(median_s=4.506, step_s=0.551, peak_gb=24.62),
        },
        notes=(
            "Whole generations (text encoding, denoising, decode). The fused LoRA's step costs 0.169 s against 0.166 s "
            "without it (+1.8%). The quantized runs that merge the LoRA before quantizing did not finish inside the "
            "call's 100 s limit (building and quantizing the random model, not the steps), so the quantized choice is "
            "not measured yet."
        ),
    ),
}


def main() -> None:
    for name, r in REPORTS.items():
        report = dict(
            name=name,
            device=DEVICE,
            mlx_version="0.32.4",
            date=DATE,
            provenance=PROVENANCE,
            command=r["command"],
            config=r["config"],
            results=r["results"],
            notes=r["notes"],
        )
        path = ASSETS / f"{name}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        chart(report, ASSETS / f"{name}.png")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
