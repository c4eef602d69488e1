from .scheduling_moderated_score import ModeratedScoreScheduler, ModeratedScoreSchedulerOutput

__all__ = ["ModeratedScoreScheduler", "ModeratedScoreSchedulerOutput"]
