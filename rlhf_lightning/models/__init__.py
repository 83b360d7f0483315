"""rlhf_lightning/models"""
