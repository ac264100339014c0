"""Tests of updetr.models and updetr.util."""
