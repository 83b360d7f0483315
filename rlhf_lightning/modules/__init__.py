"""rlhf_lightning/modules"""
