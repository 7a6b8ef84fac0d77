"""One process of a 2-process sd-jax job on this machine (run by test_multihost.py).

Usage: python multihost_worker.py PORT PROCESS_ID MODEL_DIR OUT_DIR MODE
MODE "generate": every process generates the same 5 prompts over the global mesh (4
devices in 2 processes); process 0 saves the gathered images.  MODE "batch": runs the
batch job over a prompt file, each process writing the images of its own devices.
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # noqa: E402

port, pid, model, out, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
from sd_jax import sharding  # noqa: E402

sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2

import numpy as np  # noqa: E402

from sd_jax.pipeline import StableDiffusionPipeline  # noqa: E402

pipe = StableDiffusionPipeline.from_pretrained(model)
assert pipe.mesh.devices.size == 4
if mode == "generate":
    images = pipe(["a red circle", "a blue square", "a green triangle", "a white circle", "a black square"],
                  seed=[1, 2, 3, 4, 5], num_inference_steps=4, height=32, width=32, scheduler="euler_a",
                  output_type="uint8")
    if pid == 0:
        np.save(os.path.join(out, "images.npy"), images)
else:
    from sd_jax import batch
    rows = batch.make_rows(batch.read_prompt_file(os.path.join(out, "prompts.txt")),
                           {"negative_prompt": "", "seed": 0, "steps": 3, "guidance": 7.5, "guidance_rescale": 0.0,
                            "width": 32, "height": 32, "scheduler": "ddim"}, "prompts.txt", {"ddim"})
    s = batch.run(pipe, rows, os.path.join(out, "images"), progress=False)
    print(f"process {pid}: wrote {s['written_here']}")
jax.distributed.shutdown()
