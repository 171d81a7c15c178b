"""Tests of the plan file, its validation and the baseline allocators."""
