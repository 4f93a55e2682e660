package lifecycle

// setStepHook installs a hook called before and after every teardown step.
// Only tests can set it.
func (c *Controller) setStepHook(h func(step Step, after bool)) { c.hook = h }
