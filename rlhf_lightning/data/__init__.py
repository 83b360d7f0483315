"""rlhf_lightning/data"""
