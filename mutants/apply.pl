#!/usr/bin/perl
# apply.pl MUTANT TREE: applies MUTANT (a mutants/*.mutant file) to the tree rooted at TREE.
# Every `--- find` block must occur exactly once in the file named by `file:`; each is replaced
# by the `--- replace` block after it. Exits 3 with a message when a mutant no longer applies.
use strict;
use warnings;

my ($mutant, $tree) = @ARGV;
die "usage: apply.pl MUTANT TREE\n" unless defined $tree;
open my $fh, '<', $mutant or die "$mutant: $!\n";
my @lines = <$fh>;
close $fh;

my ($file, @pairs, $mode);
for my $line (@lines) {
    if ($line eq "--- find\n") { push @pairs, ['', '']; $mode = 0; next; }
    if ($line eq "--- replace\n") { die "$mutant: --- replace before --- find\n" unless @pairs; $mode = 1; next; }
    if (!defined $mode) {
        $file = $1 if $line =~ /^file:\s*(\S+)\s*$/;
        next;
    }
    $pairs[-1][$mode] .= $line;
}
die "$mutant: no file:\n" unless defined $file;
die "$mutant: no --- find block\n" unless @pairs;

my $path = "$tree/$file";
open $fh, '<', $path or die "$path: $!\n";
local $/;
my $text = <$fh>;
close $fh;
for my $pair (@pairs) {
    my ($find, $replace) = @$pair;
    my ($count, $at) = (0, -1);
    for (my $i = index($text, $find); $i >= 0; $i = index($text, $find, $i + 1)) {
        $count++;
        $at = $i;
    }
    if ($count != 1) {
        print STDERR "$mutant: its find text occurs $count times in $file (must be once): re-target it\n";
        exit 3;
    }
    substr($text, $at, length($find)) = $replace;
}
open $fh, '>', $path or die "$path: $!\n";
print $fh $text;
close $fh;
