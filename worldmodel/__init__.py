"""World model: geometry-aware video encoder, slot attention, predictor and planner."""
