"""The equilibrium-transformer model layer: block force F(z), relaxation, EP estimators, references."""
