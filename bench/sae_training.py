"""SAE training throughput from cached activations against SAELens' live runner.

Ours (rule ``train_sae``): SAELens's ``SAETrainer`` fed from activations cached once by
``sae_corpus`` (``refusal_atlas.saes.train_topk_sae``). Reference: SAELens's
``LanguageModelSAETrainingRunner``, which runs the language model (a HookedTransformer of the same
shape) to produce activations while it trains. Same TopK SAE, width, k, batch and token count.
Prints training tokens/s of each and their ratio (ours / live; higher is better).
"""

import time

from common import hooked_twin, machine, parser, ratio, subject


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--context", type=int, default=64)
    args = p.parse_args()
    if args.smoke:
        args.tokens, args.d_sae, args.k, args.batch, args.context = 4096, 128, 8, 512, 32
    import torch
    from datasets import Dataset
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        TopKTrainingSAEConfig,
    )

    from refusal_atlas.saes.training import TopKTrainConfig, train_topk_sae

    model, _ = subject(args)
    cfg = model.config
    layer = cfg.num_hidden_layers // 2
    g = torch.Generator().manual_seed(0)
    n_seq = args.tokens // args.context + 8
    ids = torch.randint(10, cfg.vocab_size, (n_seq, args.context), generator=g)

    # ours: activations cached once (as sae_corpus does), then SAELens's trainer on them
    acts = []
    with torch.no_grad():
        for chunk in ids.split(32):
            out = model(chunk.to(args.device), output_hidden_states=True, use_cache=False)
            acts.append(out.hidden_states[layer + 1].reshape(-1, cfg.hidden_size).float().cpu())
    acts = torch.cat(acts)[: args.tokens]
    tcfg = TopKTrainConfig(d_sae=args.d_sae, k=args.k, batch_size=args.batch, training_tokens=args.tokens,
                           dead_feature_window=50, device=args.device)
    start = time.perf_counter()
    train_topk_sae(acts, tcfg, {"hook_name": f"blocks.{layer}.hook_resid_post"})
    t_ours = time.perf_counter() - start

    tl = hooked_twin(cfg, args.context, args.device)
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=cfg.hidden_size, d_sae=args.d_sae, k=args.k, device=args.device),
        model_name="bench", hook_name=f"blocks.{layer}.hook_resid_post", dataset_path="bench",
        is_dataset_tokenized=True, streaming=False, context_size=args.context, training_tokens=args.tokens,
        train_batch_size_tokens=args.batch, store_batch_size_prompts=32,
        n_batches_in_buffer=max(20, 2 * args.batch // args.context),
        device=args.device, logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, save_final_checkpoint=False,
        output_path=None, n_eval_batches=0, prepend_bos=False,
    )
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})
    start = time.perf_counter()
    LanguageModelSAETrainingRunner(runner_cfg, override_dataset=dataset, override_model=tl).run()
    t_live = time.perf_counter() - start

    print(f"machine: {machine(args.device)}; {args.tokens:,} tokens, layer {layer}, d_sae {args.d_sae}, k {args.k}, "
          f"batch {args.batch}")
    print(f"ours (cached activations -> SAETrainer): {args.tokens / t_ours:,.0f} tokens/s ({t_ours:.1f} s)")
    print(f"SAELens LanguageModelSAETrainingRunner (live model): {args.tokens / t_live:,.0f} tokens/s ({t_live:.1f} s)")
    ratio("cached/live training throughput", t_live / t_ours, "higher is better")


if __name__ == "__main__":
    main()
