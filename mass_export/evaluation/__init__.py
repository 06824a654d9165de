"""Measuring a build: accuracy against the alternatives (`mass-export eval`) and cost against a plain encoder
pass (`mass-export bench`)."""
