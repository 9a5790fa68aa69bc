"""Tasks built from prefalign's pieces: the sentiment experiment behind the demo and the study."""
