"""Cost of ownership: a self-hosted fine-tune on a dedicated GPU versus the baseline's API.

Per system, $ per 1,000 examples (API prices x tokens for the baseline, GPU $/h x time per example for local
ones); for the fine-tune and the baseline side by side, $ per 1M tokens, $ per 1,000 cases and the monthly
volume at which self-hosting breaks even. ``render_cost_lines`` is the report's (and the model card's) table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.recipe import Recipe


def _api_cost(recipe: Recipe, values: dict[str, Any]) -> float | None:
    b = recipe.baseline
    if b is None or b.price_input_per_1m is None or b.price_output_per_1m is None:
        return None
    return values["tokens_in"] * b.price_input_per_1m / 1e6 + values["tokens_out"] * b.price_output_per_1m / 1e6


def _seconds_per_case(recipe: Recipe, values: dict[str, Any]) -> tuple[float, float, str] | None:
    """(seconds per case, tokens per second, source) of a local system, from the given or measured throughput."""
    n = values.get("num_examples") or 0.0
    tokens = values["tokens_in"] + values["tokens_out"]
    if not n or not tokens:
        return None
    given = recipe.cost.throughput_tokens_per_s
    if given is not None:
        return tokens / n / given, given, "given (cost.throughput_tokens_per_s)"
    seconds = values.get("generation_seconds")
    if not seconds:
        return None
    return seconds / n, tokens / seconds, "measured"


def cost_per_1000_examples(recipe: Recipe, system: str, values: dict[str, Any]) -> float | None:
    """$ per 1,000 examples: API prices x tokens for the baseline, GPU $/h x time per example for local ones."""
    if system == "baseline":
        cost = _api_cost(recipe, values)
        answered = values["num_examples"] - values["failed"]
        return cost / answered * 1000 if cost is not None and answered else None
    price = recipe.cost.gpu_price_per_hour
    timing = _seconds_per_case(recipe, values)
    if price is None or timing is None:
        return None
    return price / 3600 * timing[0] * 1000


def cost_of_ownership(recipe: Recipe, metrics: dict[str, dict[str, Any]], device: str) -> dict[str, Any] | None:
    """Self-hosted fine-tune versus the baseline's API: per 1M tokens, per 1,000 cases, break-even volume.

    A dedicated GPU costs ``gpu_price_per_hour x hours_per_month`` whatever the volume; the API costs its
    price per case times the volume. Self-hosting breaks even at ``monthly GPU cost / API cost per case``
    cases a month, if one GPU can serve that many (``hours_per_month x 3600 / seconds per case``).

    Worked example: $2/h, 1,000 tokens/s, 500 tokens per case -> 0.5 s/case, $0.556 per 1M tokens, $0.278
    per 1,000 cases, $1,460 a month for 5,256,000 cases of capacity. An API case of 1,000 input and 100
    output tokens at $2.50/$10 per 1M costs $0.0035, so self-hosting breaks even at 1,460 / 0.0035 =
    417,143 cases a month.
    """
    out: dict[str, Any] = {
        "gpu_price_per_hour": recipe.cost.gpu_price_per_hour,
        "hours_per_month": recipe.cost.hours_per_month,
        "self_hosted": None,
        "api": None,
        "break_even_cases_per_month": None,
    }
    fine = metrics.get("finetuned")
    price = recipe.cost.gpu_price_per_hour
    if fine is not None and price is not None:
        timing = _seconds_per_case(recipe, fine)
        if timing is not None:
            seconds, tps, source = timing
            out["self_hosted"] = {
                "throughput_tokens_per_s": tps,
                "throughput_source": source if source != "measured" else f"measured during this evaluation ({device})",
                "seconds_per_case": seconds,
                "cost_per_1m_tokens": price / (tps * 3600) * 1e6,
                "cost_per_1000_cases": price / 3600 * seconds * 1000,
                "monthly_gpu_cost": price * recipe.cost.hours_per_month,
                "capacity_cases_per_month": recipe.cost.hours_per_month * 3600 / seconds,
            }
    base = metrics.get("baseline")
    if base is not None:
        cost = _api_cost(recipe, base)
        answered = base["num_examples"] - base["failed"]
        tokens = base["tokens_in"] + base["tokens_out"]
        if cost is not None and answered and tokens:
            missing = base.get("usage_not_reported", 0.0)
            out["api"] = {
                "cost_per_1m_tokens": cost / tokens * 1e6,
                "cost_per_1000_cases": cost / answered * 1000,
                "cost_per_case": cost / answered,
                # Answers without token usage add no cost: the $ per case is then a lower bound.
                "answers_without_usage": missing,
                "lower_bound": bool(missing),
            }
    hosted, api = out["self_hosted"], out["api"]
    if hosted is not None and api is not None and api["cost_per_case"] > 0:
        volume = hosted["monthly_gpu_cost"] / api["cost_per_case"]
        out["break_even_cases_per_month"] = volume
        out["one_gpu_suffices"] = volume <= hosted["capacity_cases_per_month"]
    if hosted is None and api is None:
        return None
    return out


def cost_sentence(cost: dict[str, Any]) -> str:
    """The break-even statement in words."""
    volume = cost.get("break_even_cases_per_month")
    hosted = cost.get("self_hosted")
    if volume is None or hosted is None:
        return "Break-even volume: needs both cost.gpu_price_per_hour and the baseline's prices and answers."
    if cost.get("one_gpu_suffices"):
        return (
            f"Self-hosting breaks even at {volume:,.0f} cases a month: above that a dedicated GPU "
            f"(${hosted['monthly_gpu_cost']:,.0f}/month, capacity {hosted['capacity_cases_per_month']:,.0f} cases) "
            "costs less than the API."
        )
    return (
        f"At this throughput one GPU serves at most {hosted['capacity_cases_per_month']:,.0f} cases a month, fewer "
        f"than the {volume:,.0f} at which its ${hosted['monthly_gpu_cost']:,.0f}/month would match the API: "
        "the API is cheaper at every volume unless throughput rises (cost.throughput_tokens_per_s for the target GPU)."
    )


def render_cost_lines(cost: dict[str, Any]) -> list[str]:
    """The cost block of the report: self-hosted and API side by side, then the break-even sentence."""
    hosted, api = cost.get("self_hosted"), cost.get("api")
    lines = ["| | self-hosted fine-tune | baseline API |", "|---|---|---|"]

    def cell(block: dict[str, Any] | None, key: str, fmt: str) -> str:
        if block is None or block.get(key) is None:
            return "n/a"
        # Answers without token usage cost nothing here: per case the API costs at least this much.
        bound = ">=" if block.get("lower_bound") and key == "cost_per_1000_cases" else ""
        return bound + fmt.format(block[key])

    lines += [
        f"| $ per 1M tokens | {cell(hosted, 'cost_per_1m_tokens', '${:.4f}')} | "
        f"{cell(api, 'cost_per_1m_tokens', '${:.4f}')} |",
        f"| $ per 1,000 cases | {cell(hosted, 'cost_per_1000_cases', '${:.4f}')} | "
        f"{cell(api, 'cost_per_1000_cases', '${:.4f}')} |",
    ]
    if hosted is not None:
        lines += [
            "",
            f"Self-hosted: ${cost['gpu_price_per_hour']:.2f}/h, {hosted['throughput_tokens_per_s']:,.1f} tokens/s "
            f"({hosted['throughput_source']}), {hosted['seconds_per_case']:.4f} s per case.",
        ]
    lines += ["", cost_sentence(cost)]
    if (api or {}).get("lower_bound"):
        lines += [
            "",
            f"{api['answers_without_usage']:.0f} API answers came without token usage: the API's $ per case is a "
            "lower bound, so the break-even volume is an upper bound.",
        ]
    return lines


def save_cost_plot(path: Path, cost: dict[str, Any]) -> None:
    """Monthly cost against monthly volume: the API's line and the self-hosted GPUs' steps (one more per capacity)."""
    hosted, api = cost.get("self_hosted"), cost.get("api")
    if hosted is None and api is None:
        return
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volume = cost.get("break_even_cases_per_month")
    top = 3 * volume if volume else (3 * hosted["capacity_cases_per_month"] if hosted else 1_000_000)
    xs = [top * i / 400 for i in range(401)]
    fig, ax = plt.subplots(figsize=(7, 4))
    if api is not None:
        ax.plot(xs, [x * api["cost_per_case"] for x in xs], label="baseline API")
    if hosted is not None:
        gpus = [max(1, math.ceil(x / hosted["capacity_cases_per_month"])) for x in xs]
        ax.step(xs, [g * hosted["monthly_gpu_cost"] for g in gpus], where="post", label="self-hosted (dedicated GPUs)")
    if volume:
        ax.axvline(volume, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"break-even\n{volume:,.0f} cases/month", (volume, 0), xytext=(5, 10), textcoords="offset points")
    ax.set_xlabel("cases per month")
    ax.set_ylabel("$ per month")
    ax.set_title("Cost of ownership")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
