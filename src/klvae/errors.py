"""The one exception family that the library raises for bad input; the CLI turns it into a one-line error."""


class KlvaeError(Exception):
    """Bad input or an unusable resource, described in one line for a person."""


class WeightsError(KlvaeError):
    """Weights that cannot be read, or that do not fit the model (names the keys)."""


class ImageError(KlvaeError):
    """An image that cannot be read, is truncated, or is absurdly large."""


class LatentsError(KlvaeError):
    """Latents that do not fit the model (channels) or are not finite."""
