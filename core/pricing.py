"""Estimated cost per call: a price table with defaults for known models, editable in config."""

from __future__ import annotations

import json

from pydantic import BaseModel, Field, ValidationError


class Price(BaseModel):
    """USD per million tokens (input, output); for image models also USD per image, charged
    when the server reports no output tokens for it (gpt-image models report them)."""

    input: float = Field(default=0.0, ge=0)
    output: float = Field(default=0.0, ge=0)
    image: float = Field(default=0.0, ge=0)


# List prices in USD; the longest matching prefix wins, so dated snapshots
# ("gpt-4.1-mini-2025-04-14") use their family's price. Local models cost nothing.
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-5": Price(input=1.25, output=10.0),
    "gpt-5-mini": Price(input=0.25, output=2.0),
    "gpt-5-nano": Price(input=0.05, output=0.40),
    "gpt-4.1": Price(input=2.0, output=8.0),
    "gpt-4.1-mini": Price(input=0.40, output=1.60),
    "gpt-4.1-nano": Price(input=0.10, output=0.40),
    "gpt-4o": Price(input=2.50, output=10.0),
    "gpt-4o-mini": Price(input=0.15, output=0.60),
    "o3": Price(input=2.0, output=8.0),
    "o4-mini": Price(input=1.10, output=4.40),
    "gpt-3.5-turbo": Price(input=0.50, output=1.50),
    "gpt-3.5-turbo-instruct": Price(input=1.50, output=2.0),
    "text-embedding-3-small": Price(input=0.02),
    "text-embedding-3-large": Price(input=0.13),
    "text-embedding-ada-002": Price(input=0.10),
    "gpt-image-1": Price(input=5.0, output=40.0, image=0.042),
    "gpt-image-1-mini": Price(input=2.0, output=8.0, image=0.011),
}


def parse_prices(text: str) -> dict[str, Price]:
    """PRICES_JSON: {"model prefix": {"input": USD/1M, "output": USD/1M, "image": USD}}."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("must be a JSON object of model -> prices")
        return {str(model): Price.model_validate(price) for model, price in raw.items()}
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ValueError(f"not a valid price table: {str(exc).splitlines()[0]}") from None


class PriceTable:
    """Looks up a model's price by longest prefix; unknown models cost 0. A backend's own
    prices (BACKENDS_FILE) are kept as "backend/model" and win for that backend's calls."""

    def __init__(
        self, overrides: str | None = None, backends: dict[str, dict[str, Price]] | None = None
    ) -> None:
        self.prices = {**DEFAULT_PRICES, **(parse_prices(overrides) if overrides else {})}
        for backend, prices in (backends or {}).items():
            self.prices |= {f"{backend}/{model}": price for model, price in prices.items()}
        self._by_length = sorted(self.prices, key=len, reverse=True)

    def price(self, model: str | None, backend: str | None = None) -> Price:
        if model and backend:
            own = f"{backend}/{model}"
            for prefix in self._by_length:
                if own.startswith(prefix) and prefix.startswith(f"{backend}/"):
                    return self.prices[prefix]
        for prefix in self._by_length:
            if model and model.startswith(prefix):
                return self.prices[prefix]
        return Price()

    def cost(
        self,
        model: str | None,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        images: int = 0,
        backend: str | None = None,
    ) -> float:
        p = self.price(model, backend)
        usd = (prompt_tokens * p.input + completion_tokens * p.output) / 1_000_000
        if not completion_tokens:  # images the server gave no token count for
            usd += images * p.image
        return round(usd, 8)
