"""Executors: what starts workers (worker.py) and where. local.py runs one engine process per GPU of this node;
slurm.py writes and submits the sbatch script of an array job and requeues a task that hit its time limit."""
