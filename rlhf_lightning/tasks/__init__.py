"""rlhf_lightning/tasks"""
