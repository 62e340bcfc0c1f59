package zkhosts

// InOrder makes h keep the addresses in the order they were found, for
// tests that read them back.
func (h *Provider) InOrder() { h.shuffle = func(int, func(i, j int)) {} }
