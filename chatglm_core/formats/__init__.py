"""Prompt formats: pure functions from messages to prompts and from model text to messages."""
