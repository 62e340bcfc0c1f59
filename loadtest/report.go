package loadtest

import (
	"cmp"
	"fmt"
	"io"
	"slices"
	"text/tabwriter"
)

// Unattributed is the backend name under which a Report counts calls that
// carried no backend name, such as calls the proxy itself failed.
const Unattributed = "(none)"

// Row is one backend's line in a Report.
type Row struct {
	// Backend is the name the backend reported, or Unattributed.
	Backend string
	// Addr is the backend's "host:port", or "" when not known.
	Addr string
	// Calls counts the finished calls attributed to the backend, failed
	// ones included.
	Calls int64
	// Errors counts the calls among Calls that ended with a non-OK status.
	Errors int64
}

// Report is the distribution of finished calls over backends.
type Report struct {
	// Rows has one entry per backend, in the order they should be printed.
	Rows []Row
}

// Total returns the calls and errors summed over all rows.
func (r Report) Total() (calls, errors int64) {
	for _, row := range r.Rows {
		calls += row.Calls
		errors += row.Errors
	}
	return calls, errors
}

// WriteTable writes r to w as an aligned table: one line per backend with its
// calls, share of all calls and errors, then a total line.
func (r Report) WriteTable(w io.Writer) error {
	total, totalErrs := r.Total()
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "BACKEND\tADDRESS\tCALLS\tSHARE\tERRORS")
	for _, row := range r.Rows {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%d\n", row.Backend, row.Addr, row.Calls, share(row.Calls, total), row.Errors)
	}
	fmt.Fprintf(tw, "total\t\t%d\t%s\t%d\n", total, share(total, total), totalErrs)
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("loadtest: write report: %w", err)
	}
	return nil
}

// share formats n as a percentage of total.
func share(n, total int64) string {
	if total == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f%%", 100*float64(n)/float64(total))
}

// sortRows orders rows by backend name, with Unattributed last.
func sortRows(rows []Row) {
	slices.SortFunc(rows, func(a, b Row) int {
		if (a.Backend == Unattributed) != (b.Backend == Unattributed) {
			if a.Backend == Unattributed {
				return 1
			}
			return -1
		}
		return cmp.Compare(a.Backend, b.Backend)
	})
}
