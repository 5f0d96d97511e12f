"""Stage 'vla_sft': a CPU-sized OpenVLA-OFT trained from scratch by OFT's L1 recipe (issue #15).

The architecture is the 7-B model's, shrunk (config block `vla_sft`): the fused DINOv2 + SigLIP
ViTs (timm, block L−2 features), the fused-GELU projector, a Llama (transformers), the proprio
projector and the L1 regression head, with OFT's parallel decoding (vla_spec §3.3): one
bidirectional pass over [BOS, patches, proprio, prompt, chunk×A placeholders, stop]. Every weight
is trained (the 7-B recipe trains a LoRA on a pretrained VLM; here there is nothing pretrained to
adapt) on the L1 distance between the head's chunk and the demonstrations' normalised chunk
(§3.4), with the shared resumable loop (ript.train.loop). The policy sees what it will see at run
time (ript.vla.demos); the benchmark's state vector is the proprio token.

The result is a checkpoint folder in the official layout (ript.vla.writer) that the same loader
as the released checkpoints reads, and its manifest, which stands for it in the DAG:

    python -m ript.vla.sft --data results/x/data/*.hdf5 --benchmark metaworld \
        --config '{...}' --out results/x/checkpoint/manifest.json --metrics metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from ript.config import from_dict, to_dict
from ript.envs.benchmark import get
from ript.vla.settings import VlaSftConfig
from ript.stage import add_common_args, code_hash, load_block, setup_threads, stage_tracker
from ript.train import checkpoint as ckpt
from ript.train.loop import decay_groups, train_loop
from ript.utils import seed_everything
from ript.vla.checkpoint import image_preprocessing
from ript.vla.folder import manifest
from ript.vla.demos import VLADemos, add_demo_args, prompt_table, statistics
from ript.vla.heads import L1RegressionActionHead, ProprioProjector
from ript.vla.prismatic import PrismaticVLA
from ript.vla.rl import pixel_values
from ript.vla.writer import small_config, write_checkpoint, write_tokenizer

MODEL_DIR = "model"  # the checkpoint folder, beside the manifest


class OFTModel(nn.Module):
    """The VLA and OFT's two small modules as one trainable module (one state dict to resume)."""

    def __init__(self, config: dict):
        super().__init__()
        self.vla = PrismaticVLA(config)
        self.action_head = L1RegressionActionHead(self.vla.hidden_size, self.vla.action_dim)
        self.proprio_projector = ProprioProjector(self.vla.hidden_size, self.vla.proprio_dim)

    def forward(self, input_ids, px, proprio):
        hidden = self.vla.action_hidden(input_ids, px, proprio, self.proprio_projector)
        return self.action_head(hidden)


def model_config(cfg: VlaSftConfig, action_dim: int, proprio_dim: int) -> dict:
    return small_config(cfg.hidden, cfg.layers, cfg.heads, cfg.vit_widths, cfg.vit_heads,
                        cfg.vit_depth, cfg.image_size, cfg.patch_size,
                        constants={"NUM_ACTIONS_CHUNK": cfg.chunk, "ACTION_DIM": action_dim,
                                   "PROPRIO_DIM": proprio_dim})


def run(args, cfg: VlaSftConfig) -> dict:
    seed_everything(args.seed)
    bench = get(args.benchmark, args.suite)
    files = [Path(f) for f in args.data]
    out = Path(args.out)
    folder = out.parent / MODEL_DIR
    stats = statistics(files, bench)
    config = model_config(cfg, len(stats["action"]["q01"]), len(stats["proprio"]["q01"]))
    model = OFTModel(config)  # timm's and transformers' own initialisation, seeded above
    tasks = bench.all_task_names()
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)  # the prompts need it now; the weights follow at the end
    from transformers import AutoTokenizer

    prompts = prompt_table(AutoTokenizer.from_pretrained(str(folder), local_files_only=True),
                           bench, tasks)
    norm = image_preprocessing(folder, config)  # the values the folder's loader will use
    norm = {"means": [list(m) for m in norm.means], "stds": [list(s) for s in norm.stds]}
    data = VLADemos(files, bench, stats, image_size=cfg.image_size, chunk=cfg.chunk,
                    center_crop=args.center_crop, task_names=tasks)
    print(f"vla_sft: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{len(data)} samples from {stats['num_trajectories']} demos", flush=True)

    def loss_fn(batch):
        ids = prompts[batch["task"].cpu()]
        ids = ids[:, :int(ids.ne(prompts.new_tensor(32000)).sum(1).max())]
        pred = model(ids, pixel_values(batch["images"], norm), batch["proprio"])
        loss = (pred.float() - batch["actions"]).abs().mean()
        return loss, {"loss": float(loss.detach())}

    named = list(model.named_parameters())
    groups = decay_groups(model, named, cfg.train.weight_decay, cfg.train.decay)
    ckpt_dir = out.parent / "ckpt"
    key = ckpt.resume_key(to_dict(cfg), args.seed, files, code_hash(args),
                          center_crop=args.center_crop)
    resume = ckpt.load_resume_state(ckpt_dir / "latest.pt", key)
    with stage_tracker(args, "vla-sft", to_dict(cfg), metrics=ckpt_dir / "metrics.jsonl",
                       run_id=resume["mlflow_run_id"] if resume else None) as tracker:
        if not resume and tracker.metrics_path.exists():
            tracker.metrics_path.unlink()
        summary = train_loop(model, loss_fn, groups, data, cfg.train, tracker, ckpt_dir=ckpt_dir,
                             resume=resume, resume_key=key, seed=args.seed,
                             device=torch.device("cpu"), config=to_dict(cfg))
        key_name = args.suite or bench.name
        write_checkpoint(folder, config, model.vla, {key_name: stats},
                         action_head=model.action_head, proprio_projector=model.proprio_projector,
                         dtype=torch.float32)
        out.write_text(json.dumps(manifest(folder), indent=2) + "\n")
        tracker.export_metrics(args.metrics)
        tracker.log_artifact(args.metrics)
    ckpt.clear_resume_state(ckpt_dir)
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    add_demo_args(p)
    p.add_argument("--out", required=True, help="manifest (JSON); the folder is model/ beside it")
    p.add_argument("--metrics", required=True)
    a = p.parse_args(argv)
    setup_threads(a)
    run(a, from_dict(VlaSftConfig, load_block(a.config), "vla_sft"))


if __name__ == "__main__":
    main()
