"""Fine-tuning: training data loading, response-only loss masking, and the trainers built on them."""
