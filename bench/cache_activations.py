"""cache_activations throughput against a bare HF forward pass over the same batches.

Ours: ``refusal_atlas.lm.activations.last_token_resid_post`` (hooks on every block, last-token rows to
the CPU). Bare: ``model(**batch)`` with nothing else, over identical left-padded chat batches.
Goal: throughput ratio ours / bare >= 0.9.
"""

from common import machine, parser, prompts, ratio, subject, timed


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    if args.smoke:
        args.prompts, args.repeats = 32, 1
    import torch

    from refusal_atlas.lm.activations import last_token_resid_post
    from refusal_atlas.lm.generation import chat_batches

    model, tok = subject(args)
    texts = prompts(args.prompts)
    batches = [enc for _, enc in chat_batches(tok, texts, args.batch_size, None, args.device)]
    n_tokens = sum(int(enc["attention_mask"].sum()) for enc in batches)

    def bare():
        with torch.no_grad():
            for enc in batches:
                model(**enc, use_cache=False)

    def ours():
        last_token_resid_post(model, tok, texts, batch_size=args.batch_size)

    t_bare = timed(bare, args.repeats, args.device)
    t_ours = timed(ours, args.repeats, args.device)
    print(f"machine: {machine(args.device)}; {len(texts)} prompts, {n_tokens} tokens, batch {args.batch_size}")
    print(f"bare HF forward: {n_tokens / t_bare:,.0f} tokens/s ({t_bare:.2f} s)")
    print(f"cache_activations: {n_tokens / t_ours:,.0f} tokens/s ({t_ours:.2f} s)")
    ratio("cache_activations/bare_forward throughput", t_bare / t_ours, "goal >= 0.9")


if __name__ == "__main__":
    main()
