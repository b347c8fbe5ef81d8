"""`gsmkit steer`: steering vectors (`vectors`: CAA contrast pairs, DAC few-shot against zero-shot
prompts; the activation cache) and the Optuna search of layer and strength (`search_*`, `splits`)."""
