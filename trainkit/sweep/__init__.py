"""Sweeps: run every (config, dataset, seed) combination on one node, or as a SLURM job array.

    python -m trainkit.sweep run --configs configs/a.yaml configs/b.yaml --seeds 1 2 3 \\
        --datasets sst2 mrpc --gpus "0 1 3" --gpu-plan "2,2,1" \\
        [--sweep-dir sweeps/glue] [--output-dir outputs] [--script train_lora.py] \\
        [--python "accelerate launch --num_processes 1"] [--cpu-slots N] \\
        [--dry-run] [--foreground] [-- training.max_steps=500 optimization.learning_rate=2e-4]
    python -m trainkit.sweep status [--sweep-dir sweeps/glue] [--json]
    python -m trainkit.sweep slurm --configs configs/a.yaml --seeds 1 2 3 --datasets sst2 mrpc \\
        --partition gpu --gpus-per-job 1 --time 04:00:00 [--max-concurrent 8] \\
        [--account A] [--cpus-per-task 8] [--mem 64G] [--out sweep.sbatch] [-- overrides ...]

One module per job:

    plan.py       the jobs (config x dataset x seed), their commands and run directories, GPU slots,
                  and what each run directory says (finished, running elsewhere, resumable, to do)
    scheduler.py  `run`: the pool of slots on this node, <sweep dir>/state.json, detaching
    status.py     `status`: the jobs of a sweep with their progress
    slurm.py      `slurm`: a job-array script instead of running anything
    cli.py        the command line (`python -m trainkit.sweep`); errors in the selection print one
                  line `sweep: error: ...` and exit 2
"""
