"""Mixtral-style Mixture-of-Experts transformer in plain PyTorch (single device)."""

from moe_model.config import ModelConfig
from moe_model.model import MoEOutput, MoETransformer
from moe_model.routing_stats import RoutingStats, routing_metrics

__all__ = ["ModelConfig", "MoEOutput", "MoETransformer", "RoutingStats", "routing_metrics"]
