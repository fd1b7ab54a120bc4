"""Writers: the bytes of one role (model, optimizer, LR scheduler) in one strategy's format."""

from skyrl_callbacks.writers.base import RoleWriter, select_writer

__all__ = ["RoleWriter", "select_writer"]
