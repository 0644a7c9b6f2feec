"""Exceptions. Every message names what is wrong and where: section, tensor, byte range."""


class SnapshotError(Exception):
    """Base class: anything wrong with a snapshot or with how it is used."""


class CorruptSnapshotError(SnapshotError):
    """The bytes are not a valid snapshot: damaged, truncated, hostile, or breaking a structural rule."""


class UnsupportedVersionError(SnapshotError):
    """A valid-looking snapshot this reader cannot read: another major version or an unknown required feature."""


class IncompatibleSnapshotError(SnapshotError):
    """A valid snapshot that does not fit the target: another model, dtype, or KV layout."""


class UnknownWeightsError(SnapshotError):
    """A capture refused: the engine's weights were changed in place without a digest (weights_changed()), so a
    snapshot could not name them."""


class MissingTensorError(KeyError, SnapshotError):
    """A tensor name the snapshot does not hold; the message lists the closest names it does hold."""

    def __str__(self) -> str:  # KeyError's own str() would print the message as a quoted repr
        return str(self.args[0]) if self.args else ""
